//! MQTT 3.1.1 conformance: normative statements that interoperability suites (Paho's
//! client_test.py and others) check, and that the other end-to-end files leave out.
//! Each test names its statements; every exchange is on the wire through `RawClient`.

use std::time::Duration;

use outpost_mqtt::{
    Packet, Properties, Protocol, PubResponse, Publish, QoS, ReasonCode, Subscribe,
    SubscribeFilter, Unsubscribe,
};
use outpost_tests::raw::{bytes_of, connect_packet, publish, sub_opts, will};
use outpost_tests::{Broker, QUIET, RawClient, WAIT, assert_broker_serves};

const V4: Protocol = Protocol::V3_1_1;

/// Connect a 3.1.1 client and check the CONNACK accepts it.
async fn connect(port: u16, id: &str, clean: bool) -> (RawClient, bool) {
    let (c, ack) = RawClient::connect(port, connect_packet(V4, id, clean)).await;
    assert_eq!(ack.reason, ReasonCode::SUCCESS, "CONNACK for {id}");
    (c, ack.session_present)
}

/// A connected client subscribed to `filter` at `qos`.
async fn subscriber(port: u16, id: &str, filter: &str, qos: QoS) -> RawClient {
    let (mut c, _) = connect(port, id, true).await;
    let granted = c
        .subscribe(1, filter, sub_opts(qos), Properties::default())
        .await;
    assert_eq!(granted, ReasonCode(qos as u8), "SUBACK for {filter}");
    c
}

/// Publish at QoS 1 and wait for the PUBACK.
async fn publish_qos1(c: &mut RawClient, topic: &str, payload: &[u8], retain: bool, id: u16) {
    let mut p = publish(topic, QoS::AtLeastOnce, Some(id), payload);
    p.retain = retain;
    c.send(&Packet::Publish(p)).await;
    match c.expect_packet(WAIT).await {
        Packet::PubAck(a) => assert_eq!(a.packet_id, id, "PUBACK packet id"),
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

/// A fresh client that publishes one QoS 1 message and disconnects.
async fn publish_once(port: u16, id: &str, topic: &str, payload: &[u8], retain: bool) {
    let (mut c, _) = connect(port, id, true).await;
    publish_qos1(&mut c, topic, payload, retain, 1).await;
    c.disconnect().await;
}

/// Assert the broker refused a CONNECT: no successful CONNACK, and the connection closes.
async fn assert_connect_refused(port: u16, bytes: &[u8]) {
    let mut raw = RawClient::tcp(port, V4).await;
    raw.send_bytes(bytes).await;
    let head = raw.read_bytes(4, WAIT).await;
    assert_ne!(
        head,
        vec![0x20, 0x02, 0x00, 0x00],
        "a CONNECT that breaks the rules was accepted"
    );
    if !head.is_empty() {
        assert_eq!(head[0], 0x20, "only a CONNACK may answer: {head:02x?}");
    }
    assert!(
        raw.closed_within(WAIT).await,
        "the connection stayed open after a bad CONNECT"
    );
}

/// Assert the broker closes a connected client after `bytes` without answering.
async fn assert_packet_closes(port: u16, id: &str, bytes: &[u8]) {
    let (mut c, _) = connect(port, id, true).await;
    c.send_bytes(bytes).await;
    let got = c.expect_closed(WAIT).await;
    assert!(
        got.is_empty(),
        "3.1.1 has no reply to a malformed packet: {got:?}"
    );
}

/// A CONNECT body with explicit flags, client id and optional extra payload fields.
fn connect_bytes(flags: u8, client_id: &str, extra: &[&[u8]]) -> Vec<u8> {
    let mut body = bytes_of::string(b"MQTT");
    body.extend_from_slice(&[4, flags, 0, 30]);
    body.extend(bytes_of::string(client_id.as_bytes()));
    for field in extra {
        body.extend(bytes_of::string(field));
    }
    bytes_of::packet(0x10, &body)
}

/// MQTT-3.1.2-6, MQTT-3.2.2-3: a Clean Session 1 session lasts only as long as its
/// network connection, so a Clean Session 0 CONNECT that takes it over must not find
/// (or report) any session state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_of_a_clean_session_does_not_resume_it_mqtt_3_1_2_6() {
    let broker = Broker::start("");
    let port = broker.port();
    let mut first = subscriber(port, "cf4-take-clean", "cf4/take-clean", QoS::AtLeastOnce).await;
    let (mut second, present) = connect(port, "cf4-take-clean", false).await;
    assert!(
        !present,
        "Session Present=1 resumed a Clean Session 1 session that ended with its connection"
    );
    first.expect_closed(WAIT).await;
    publish_once(port, "cf4-take-clean-pub", "cf4/take-clean", b"x", false).await;
    second.expect_silence(QUIET).await;
}

/// MQTT-3.1.2-6, MQTT-3.2.2-3: state of a Clean Session 1 session is not reused by a
/// later Clean Session 0 connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_session_state_is_not_reused_after_disconnect_mqtt_3_1_2_6() {
    let broker = Broker::start("");
    let port = broker.port();
    let mut c = subscriber(port, "cf4-clean-reuse", "cf4/clean-reuse", QoS::AtLeastOnce).await;
    c.disconnect().await;
    assert!(c.closed_within(WAIT).await);
    let (mut c, present) = connect(port, "cf4-clean-reuse", false).await;
    assert!(!present, "Session Present must be 0 (MQTT-3.2.2-3)");
    publish_once(port, "cf4-clean-reuse-pub", "cf4/clean-reuse", b"x", false).await;
    c.expect_silence(QUIET).await;
}

/// MQTT-4.3.3-2: the receiver MUST respond to a PUBREL with a PUBCOMP carrying the same
/// packet identifier, also when it holds no state for it; acknowledgements for unknown
/// identifiers (PUBACK, PUBCOMP) are not a reason to drop the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubrel_for_unknown_id_gets_pubcomp_mqtt_4_3_3_2() {
    let broker = Broker::start("");
    let (mut c, _) = connect(broker.port(), "cf4-pubrel", true).await;
    c.send_bytes(&[0x62, 0x02, 0x00, 0x2A]).await;
    assert_eq!(
        c.read_bytes(4, WAIT).await,
        vec![0x70, 0x02, 0x00, 0x2A],
        "expected PUBCOMP for packet id 42"
    );
    c.send_bytes(&[0x40, 0x02, 0x12, 0x34]).await; // PUBACK, unknown id
    c.send_bytes(&[0x70, 0x02, 0x12, 0x35]).await; // PUBCOMP, unknown id
    c.send(&Packet::PingReq).await;
    assert_eq!(c.expect_packet_raw(WAIT).await, Packet::PingResp);
}

/// MQTT-3.10.4-4, MQTT-3.10.4-5: UNSUBACK with the same packet identifier, even when no
/// subscription matched the filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsuback_is_sent_for_a_filter_never_subscribed_mqtt_3_10_4_5() {
    let broker = Broker::start("");
    let (mut c, _) = connect(broker.port(), "cf4-unsub-none", true).await;
    let mut body = vec![0x01, 0x02];
    body.extend(bytes_of::string(b"cf4/never"));
    c.send_bytes(&bytes_of::packet(0xA2, &body)).await;
    assert_eq!(
        c.read_bytes(4, WAIT).await,
        vec![0xB0, 0x02, 0x01, 0x02],
        "expected UNSUBACK for packet id 0x0102"
    );
}

/// MQTT-3.10.4-1: UNSUBSCRIBE filters are compared character by character; "a/b" does
/// not remove a "a/+" subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_matches_filters_literally_mqtt_3_10_4_1() {
    let broker = Broker::start("");
    let port = broker.port();
    let mut c = subscriber(port, "cf4-unsub-lit", "cf4/lit/+", QoS::AtMostOnce).await;
    c.send(&Packet::Unsubscribe(Unsubscribe {
        packet_id: 2,
        filters: vec!["cf4/lit/a".into()],
        properties: Properties::default(),
    }))
    .await;
    match c.expect_packet(WAIT).await {
        Packet::UnsubAck(a) => assert_eq!(a.packet_id, 2),
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    publish_once(port, "cf4-unsub-lit-pub", "cf4/lit/a", b"still", false).await;
    let p = c.expect_publish(WAIT).await;
    assert_eq!(
        &p.payload[..],
        b"still",
        "an UNSUBSCRIBE of another filter removed the wildcard subscription"
    );
}

/// MQTT-4.3.3-2 (3.1.1): after it has sent PUBCOMP the receiver treats a PUBLISH with
/// the same packet identifier as a new publication, which must be delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_packet_id_is_reusable_after_pubcomp_mqtt_4_3_3_2() {
    let broker = Broker::start("");
    let port = broker.port();
    let mut sub = subscriber(port, "cf4-reuse-sub", "cf4/reuse", QoS::AtMostOnce).await;
    let (mut c, _) = connect(port, "cf4-reuse-pub", true).await;
    for payload in [&b"first"[..], &b"second"[..]] {
        c.send(&Packet::Publish(publish(
            "cf4/reuse",
            QoS::ExactlyOnce,
            Some(7),
            payload,
        )))
        .await;
        match c.expect_packet(WAIT).await {
            Packet::PubRec(r) => assert_eq!(r.packet_id, 7),
            other => panic!("expected PUBREC, got {other:?}"),
        }
        c.send(&Packet::PubRel(PubResponse::new(7))).await;
        match c.expect_packet(WAIT).await {
            Packet::PubComp(r) => assert_eq!(r.packet_id, 7),
            other => panic!("expected PUBCOMP, got {other:?}"),
        }
        let p = sub.expect_publish(WAIT).await;
        assert_eq!(&p.payload[..], payload, "reused packet id lost a message");
    }
    sub.expect_silence(QUIET).await;
}

/// MQTT-3.3.1-10 (3.1.1): a retained PUBLISH with an empty payload is delivered as normal
/// to current subscribers, and removes the retained message for future ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_retained_publish_reaches_current_subscribers_mqtt_3_3_1_10() {
    let broker = Broker::start("");
    let port = broker.port();
    let mut sub = subscriber(port, "cf4-zr-sub", "cf4/zr", QoS::AtLeastOnce).await;
    let (mut c, _) = connect(port, "cf4-zr-pub", true).await;
    publish_qos1(&mut c, "cf4/zr", b"kept", true, 1).await;
    let p = sub.expect_publish(WAIT).await;
    assert_eq!(&p.payload[..], b"kept");
    sub.puback(p.packet_id.expect("QoS 1")).await;
    publish_qos1(&mut c, "cf4/zr", b"", true, 2).await;
    let p = sub.expect_publish(WAIT).await;
    assert!(
        p.payload.is_empty(),
        "the clearing message must be delivered as is"
    );
    assert!(!p.retain, "live delivery carries RETAIN=0 (MQTT-3.3.1-9)");
    sub.puback(p.packet_id.expect("QoS 1")).await;
    let mut late = subscriber(port, "cf4-zr-late", "cf4/zr", QoS::AtLeastOnce).await;
    late.expect_silence(QUIET).await;
}

/// MQTT-3.3.1-7 (3.1.1): a retained QoS 0 message replaces the retained message too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_qos0_message_replaces_the_retained_message_mqtt_3_3_1_7() {
    let broker = Broker::start("");
    let port = broker.port();
    let (mut c, _) = connect(port, "cf4-r0-pub", true).await;
    publish_qos1(&mut c, "cf4/r0", b"old", true, 1).await;
    let mut p = publish("cf4/r0", QoS::AtMostOnce, None, b"new");
    p.retain = true;
    c.send(&Packet::Publish(p)).await;
    // A round trip after the QoS 0 publish proves the broker has processed it.
    c.send(&Packet::PingReq).await;
    assert_eq!(c.expect_packet_raw(WAIT).await, Packet::PingResp);
    let mut sub = subscriber(port, "cf4-r0-sub", "cf4/r0", QoS::AtLeastOnce).await;
    let got = sub.expect_publish(WAIT).await;
    assert_eq!(&got.payload[..], b"new", "QoS 0 retained did not replace");
    assert_eq!(got.qos, QoS::AtMostOnce);
    assert!(got.retain);
    sub.expect_silence(QUIET).await;
}

/// MQTT-4.7.2-1: filters starting with a wildcard do not match topics starting with "$",
/// live or retained; a filter naming the "$" level does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dollar_topics_are_not_matched_by_leading_wildcards_mqtt_4_7_2_1() {
    let broker = Broker::start("");
    let port = broker.port();
    let mut hash = subscriber(port, "cf4-dol-hash", "#", QoS::AtLeastOnce).await;
    let mut plus = subscriber(port, "cf4-dol-plus", "+/cf4dol/#", QoS::AtLeastOnce).await;
    let mut named = subscriber(port, "cf4-dol-named", "$cf4dol/#", QoS::AtLeastOnce).await;
    let (mut c, _) = connect(port, "cf4-dol-pub", true).await;
    publish_qos1(&mut c, "$cf4dol/live", b"live", false, 1).await;
    publish_qos1(&mut c, "$cf4dol/kept", b"kept", true, 2).await;
    let a = named.expect_publish(WAIT).await;
    let b = named.expect_publish(WAIT).await;
    assert_eq!(
        (&a.topic[..], &b.topic[..]),
        ("$cf4dol/live", "$cf4dol/kept")
    );
    for c in [&mut hash, &mut plus] {
        // Only the broker's own traffic may arrive here, never a "$" topic.
        while let Ok(p) = c.recv(QUIET).await {
            if let Packet::Publish(p) = p {
                assert!(!p.topic.starts_with('$'), "{} matched a wildcard", p.topic);
            }
        }
    }
    let mut late = subscriber(port, "cf4-dol-late", "#", QoS::AtLeastOnce).await;
    while let Ok(p) = late.recv(QUIET).await {
        if let Packet::Publish(p) = p {
            assert!(
                !p.topic.starts_with('$'),
                "retained {} sent for \"#\"",
                p.topic
            );
        }
    }
}

/// MQTT-3.3.1-3: the DUP flag of an incoming PUBLISH is not propagated to subscribers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dup_flag_is_not_propagated_mqtt_3_3_1_3() {
    let broker = Broker::start("");
    let port = broker.port();
    let mut sub = subscriber(port, "cf4-dup-sub", "cf4/dup", QoS::AtLeastOnce).await;
    let (mut c, _) = connect(port, "cf4-dup-pub", true).await;
    let mut p = publish("cf4/dup", QoS::AtLeastOnce, Some(3), b"d");
    p.dup = true;
    c.send(&Packet::Publish(p)).await;
    match c.expect_packet(WAIT).await {
        Packet::PubAck(a) => assert_eq!(a.packet_id, 3),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    let got = sub.expect_publish(WAIT).await;
    assert!(!got.dup, "DUP=1 was propagated to a first delivery");
}

/// MQTT-3.1.4-2, MQTT-3.1.2-8: when a second connection takes over the client id, the
/// first one is closed without DISCONNECT, so its will is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_publishes_the_will_of_the_old_connection_mqtt_3_1_4_2() {
    let broker = Broker::start("");
    let port = broker.port();
    let mut watcher = subscriber(port, "cf4-tw-watch", "cf4/tw/will", QoS::AtLeastOnce).await;
    let mut c = connect_packet(V4, "cf4-tw", true);
    c.will = Some(will("cf4/tw/will", "gone", QoS::AtLeastOnce, false));
    let (mut first, _) = RawClient::connect(port, c).await;
    let (_second, _) = connect(port, "cf4-tw", true).await;
    first.expect_closed(WAIT).await;
    let p = watcher.expect_publish(WAIT).await;
    assert_eq!(&p.payload[..], b"gone");
}

/// MQTT-3.1.2-8 (3.1.1): the will is published when the server closes the connection
/// because of a protocol error (section 3.1.2.5; here a PUBLISH with QoS 3,
/// MQTT-3.3.1-4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_error_publishes_the_will_mqtt_3_1_2_8() {
    let broker = Broker::start("");
    let port = broker.port();
    let mut watcher = subscriber(port, "cf4-pew-watch", "cf4/pew/will", QoS::AtLeastOnce).await;
    let mut c = connect_packet(V4, "cf4-pew", true);
    c.will = Some(will("cf4/pew/will", "broken", QoS::AtLeastOnce, false));
    let (mut raw, _) = RawClient::connect(port, c).await;
    raw.send_bytes(&bytes_of::publish(
        0x06,
        b"cf4/pew/x",
        Some(1),
        false,
        b"q3",
    ))
    .await;
    raw.expect_closed(WAIT).await;
    let p = watcher.expect_publish(WAIT).await;
    assert_eq!(&p.payload[..], b"broken");
}

/// MQTT-3.1.2-1: a CONNECT with a wrong protocol name is not processed as MQTT 3.1.1,
/// so (MQTT-3.1.4-1) the connection closes without a CONNACK: return code 1 belongs to a
/// right name with an unsupported level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_protocol_name_is_closed_without_connack_mqtt_3_1_2_1() {
    let broker = Broker::start("");
    for name in [&b"MQTX"[..], b"mqtt", b"HTTP", b""] {
        let mut raw = RawClient::tcp(broker.port(), V4).await;
        raw.send_bytes(&bytes_of::connect(name, 4, "cf4-name"))
            .await;
        let head = raw.read_bytes(4, WAIT).await;
        assert!(head.is_empty(), "{name:?} was answered: {head:02x?}");
        assert!(raw.closed_within(WAIT).await, "{name:?}: still open");
    }
    // A known name with an unknown level is answered with return code 1.
    assert_connect_refused(broker.port(), &bytes_of::connect(b"MQTT", 6, "cf4-lvl")).await;
    assert_broker_serves(broker.port(), "cf4-name").await;
}

/// MQTT-3.1.2-22: with the User Name flag 0 the Password flag MUST be 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_without_user_name_is_refused_mqtt_3_1_2_22() {
    let broker = Broker::start("");
    let bad = connect_bytes(0x02 | 0x40, "cf4-pw", &[b"secret"]);
    assert_connect_refused(broker.port(), &bad).await;
}

/// MQTT-3.1.2-11, MQTT-3.1.2-13, MQTT-3.1.2-15: without the Will flag, Will QoS and
/// Will Retain MUST be 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_qos_or_retain_without_will_flag_is_refused_mqtt_3_1_2_13_15() {
    let broker = Broker::start("");
    assert_connect_refused(broker.port(), &connect_bytes(0x02 | 0x08, "cf4-wq", &[])).await;
    assert_connect_refused(broker.port(), &connect_bytes(0x02 | 0x20, "cf4-wr", &[])).await;
}

/// MQTT-3-8.3-4: a SUBSCRIBE whose requested QoS is 3 or whose reserved option bits are
/// set is malformed: the connection is closed, nothing is granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_with_qos_3_or_reserved_bits_closes_mqtt_3_8_3_4() {
    let broker = Broker::start("");
    for (i, options) in [0x03u8, 0x05, 0x81].into_iter().enumerate() {
        let mut body = vec![0x00, 0x01];
        body.extend(bytes_of::string(b"cf4/subbad"));
        body.push(options);
        assert_packet_closes(
            broker.port(),
            &format!("cf4-subbad-{i}"),
            &bytes_of::packet(0x82, &body),
        )
        .await;
    }
}

/// MQTT-3.10.1-1, MQTT-3.6.1-1: UNSUBSCRIBE and PUBREL with fixed header flags other than
/// 0010 are malformed and close the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_and_pubrel_with_bad_flags_close_mqtt_3_10_1_1_and_3_6_1_1() {
    let broker = Broker::start("");
    let mut body = vec![0x00, 0x01];
    body.extend(bytes_of::string(b"cf4/x"));
    assert_packet_closes(broker.port(), "cf4-flags-u", &bytes_of::packet(0xA0, &body)).await;
    assert_packet_closes(broker.port(), "cf4-flags-r", &[0x60, 0x02, 0x00, 0x01]).await;
}

/// MQTT-4.7.3-1: a topic name must be at least one character long; a PUBLISH with an
/// empty topic closes the connection and is not routed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_with_empty_topic_closes_mqtt_4_7_3_1() {
    let broker = Broker::start("");
    let port = broker.port();
    let mut sub = subscriber(port, "cf4-empty-sub", "#", QoS::AtMostOnce).await;
    let bad = bytes_of::publish(0x02, b"", Some(1), false, b"nowhere");
    assert_packet_closes(port, "cf4-empty-pub", &bad).await;
    while let Ok(p) = sub.recv(QUIET).await {
        if let Packet::Publish(p) = p {
            assert_ne!(&p.payload[..], b"nowhere", "empty-topic PUBLISH was routed");
        }
    }
}

/// MQTT-4.4.0-1, MQTT-3.3.1-1: an unacknowledged QoS 2 PUBLISH (no PUBREC yet) is resent
/// on reconnect with Clean Session 0, with DUP=1 and its original packet identifier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_qos2_publish_is_resent_with_dup_mqtt_4_4_0_1() {
    let broker = Broker::start("");
    let port = broker.port();
    let (mut c, _) = connect(port, "cf4-redo2", false).await;
    c.subscribe(
        1,
        "cf4/redo2",
        sub_opts(QoS::ExactlyOnce),
        Properties::default(),
    )
    .await;
    let (mut p, _) = connect(port, "cf4-redo2-pub", true).await;
    p.send(&Packet::Publish(publish(
        "cf4/redo2",
        QoS::ExactlyOnce,
        Some(5),
        b"two",
    )))
    .await;
    // Complete the inbound flow: a broker may deliver on PUBREL (method A of 4.3.3).
    assert!(matches!(p.expect_packet(WAIT).await, Packet::PubRec(_)));
    p.send(&Packet::PubRel(PubResponse::new(5))).await;
    assert!(matches!(p.expect_packet(WAIT).await, Packet::PubComp(_)));
    let first = c.expect_publish(WAIT).await;
    assert!(!first.dup);
    let id = first.packet_id.expect("QoS 2 has a packet id");
    c.drop_abruptly();
    let (mut c, present) = connect(port, "cf4-redo2", false).await;
    assert!(present);
    let again = c.expect_publish(WAIT).await;
    assert!(again.dup, "resent PUBLISH must have DUP=1");
    assert_eq!(again.packet_id, Some(id));
    assert_eq!(again.qos, QoS::ExactlyOnce);
    assert_eq!(&again.payload[..], b"two");
    c.send(&Packet::PubRec(PubResponse::new(id))).await;
    match c.expect_packet(WAIT).await {
        Packet::PubRel(r) => assert_eq!(r.packet_id, id),
        other => panic!("expected PUBREL, got {other:?}"),
    }
    c.send(&Packet::PubComp(PubResponse::new(id))).await;
    c.expect_silence(QUIET).await;
}

/// MQTT-3.8.4-3: a SUBSCRIBE that replaces an existing subscription re-sends the matching
/// retained messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribe_resends_retained_messages_mqtt_3_8_4_3() {
    let broker = Broker::start("");
    let port = broker.port();
    publish_once(port, "cf4-resub-pub", "cf4/resub", b"r", true).await;
    let mut c = subscriber(port, "cf4-resub", "cf4/resub", QoS::AtMostOnce).await;
    let p = c.expect_publish(WAIT).await;
    assert!(p.retain && &p.payload[..] == b"r");
    let again = c
        .subscribe(
            2,
            "cf4/resub",
            sub_opts(QoS::AtMostOnce),
            Properties::default(),
        )
        .await;
    assert_eq!(again, ReasonCode::GRANTED_QOS_0);
    let p = c.expect_publish(WAIT).await;
    assert!(
        p.retain && &p.payload[..] == b"r",
        "retained not re-sent: {p:?}"
    );
}

/// MQTT-4.7.1-3: "+" matches exactly one level, which may be empty; "a/+" does not
/// match "a".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_level_wildcard_matches_an_empty_level_mqtt_4_7_1_3() {
    let broker = Broker::start("");
    let port = broker.port();
    let mut sub = subscriber(port, "cf4-plus-sub", "cf4/plus/+", QoS::AtLeastOnce).await;
    let (mut c, _) = connect(port, "cf4-plus-pub", true).await;
    for (i, t) in ["cf4/plus", "cf4/plus/", "cf4/plus/a", "cf4/plus/a/b"]
        .into_iter()
        .enumerate()
    {
        publish_qos1(&mut c, t, t.as_bytes(), false, i as u16 + 1).await;
    }
    let mut topics = Vec::new();
    for _ in 0..2 {
        let p = sub.expect_publish(WAIT).await;
        sub.puback(p.packet_id.expect("QoS 1")).await;
        topics.push(p.topic.to_string());
    }
    sub.expect_silence(QUIET).await;
    assert_eq!(topics, ["cf4/plus/", "cf4/plus/a"]);
}

/// MQTT-2.3.1-1, MQTT-2.3.1-2, MQTT-2.3.1-4: each unacknowledged QoS 1 PUBLISH the
/// server sends has its own non-zero, currently unused packet identifier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inflight_messages_use_distinct_packet_ids_mqtt_2_3_1_2() {
    let broker = Broker::start("");
    let port = broker.port();
    let mut sub = subscriber(port, "cf4-ids-sub", "cf4/ids", QoS::AtLeastOnce).await;
    let (mut c, _) = connect(port, "cf4-ids-pub", true).await;
    for i in 1..=5u16 {
        publish_qos1(&mut c, "cf4/ids", &[i as u8], false, i).await;
    }
    let mut ids = Vec::new();
    for _ in 0..5 {
        let p = sub.expect_publish(WAIT).await;
        ids.push(p.packet_id.expect("QoS 1"));
    }
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(
        unique.len(),
        5,
        "packet ids reused while in flight: {ids:?}"
    );
    assert!(!ids.contains(&0));
}

/// MQTT-3.8.4-4/5 (3.1.1): one SUBSCRIBE with several filters is answered by a single
/// SUBACK whose return codes follow the filter order, and each filter is live after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_filter_subscribe_makes_every_filter_live_mqtt_3_8_4_5() {
    let broker = Broker::start("");
    let port = broker.port();
    let (mut c, _) = connect(port, "cf4-multi", true).await;
    c.send(&Packet::Subscribe(Subscribe {
        packet_id: 9,
        filters: ["cf4/m/a", "cf4/m/b/#"]
            .iter()
            .map(|f| SubscribeFilter {
                filter: (*f).into(),
                options: sub_opts(QoS::AtLeastOnce),
            })
            .collect(),
        properties: Properties::default(),
    }))
    .await;
    match c.expect_packet(WAIT).await {
        Packet::SubAck(a) => {
            assert_eq!(a.packet_id, 9);
            assert_eq!(a.reason_codes, vec![ReasonCode(1), ReasonCode(1)]);
        }
        other => panic!("expected one SUBACK, got {other:?}"),
    }
    publish_once(port, "cf4-multi-p1", "cf4/m/a", b"a", false).await;
    publish_once(port, "cf4-multi-p2", "cf4/m/b/c", b"b", false).await;
    let mut got: Vec<Publish> = Vec::new();
    for _ in 0..2 {
        got.push(c.expect_publish(Duration::from_secs(5)).await);
    }
    let mut payloads: Vec<&[u8]> = got.iter().map(|p| &p.payload[..]).collect();
    payloads.sort();
    assert_eq!(payloads, vec![&b"a"[..], &b"b"[..]]);
}

/// MQTT-3.1.3-6, MQTT-3.1.4-2 (Paho test_zero_length_clientid): each zero-length client
/// id gets its own unique identifier, so two such clients do not take each other over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_length_client_ids_do_not_take_each_other_over_mqtt_3_1_3_6() {
    let broker = Broker::start("");
    let port = broker.port();
    let (mut a, _) = connect(port, "", true).await;
    let (mut b, _) = connect(port, "", true).await;
    for (i, c) in [&mut a, &mut b].into_iter().enumerate() {
        let t = format!("cf4/zid/{i}");
        c.subscribe(1, &t, sub_opts(QoS::AtLeastOnce), Properties::default())
            .await;
        publish_once(port, &format!("cf4-zid-pub-{i}"), &t, b"x", false).await;
        let p = c.expect_publish(WAIT).await;
        assert_eq!(&p.topic[..], t, "client {i} lost its connection");
    }
}

/// MQTT-2.3.1-1: SUBSCRIBE, UNSUBSCRIBE and QoS > 0 PUBLISH carry a non-zero packet
/// identifier; a zero one is malformed and closes the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_packet_identifier_closes_the_connection_mqtt_2_3_1_1() {
    let broker = Broker::start("");
    let port = broker.port();
    let mut sub = vec![0x00, 0x00];
    sub.extend(bytes_of::string(b"cf4/pid0"));
    sub.push(0x01);
    let mut unsub = vec![0x00, 0x00];
    unsub.extend(bytes_of::string(b"cf4/pid0"));
    let cases = [
        bytes_of::packet(0x82, &sub),
        bytes_of::packet(0xA2, &unsub),
        bytes_of::publish(0x02, b"cf4/pid0", Some(0), false, b"x"),
    ];
    for (i, bytes) in cases.iter().enumerate() {
        assert_packet_closes(port, &format!("cf4-pid0-{i}"), bytes).await;
    }
}

/// MQTT-4.7.1-2, MQTT-4.7.1-3: "#" and "+" must occupy a whole level ("a/b#", "a/+b" are
/// invalid); such a filter is never granted: SUBACK 0x80 or the connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_inside_a_level_are_never_granted_mqtt_4_7_1_2() {
    let broker = Broker::start("");
    for (i, filter) in [&b"cf4/sp#"[..], b"cf4/+x/y", b"cf4/#/z"]
        .into_iter()
        .enumerate()
    {
        let what = String::from_utf8_lossy(filter).to_string();
        let (mut c, _) = connect(broker.port(), &format!("cf4-badwild-{i}"), true).await;
        let mut body = vec![0x00, 0x01];
        body.extend(bytes_of::string(filter));
        body.push(0x01);
        c.send_bytes(&bytes_of::packet(0x82, &body)).await;
        match c.recv(WAIT).await {
            Ok(Packet::SubAck(a)) => {
                assert_eq!(a.reason_codes, vec![ReasonCode(0x80)], "{what} was granted")
            }
            Err(outpost_tests::raw::RawError::Closed) => {}
            other => panic!("{what}: expected SUBACK 0x80 or a close, got {other:?}"),
        }
    }
}

/// MQTT-1.5.3-3: U+FEFF is a character of the topic, never stripped: a topic starting
/// with it is distinct from the same topic without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_order_mark_in_a_topic_is_kept_mqtt_1_5_3_3() {
    let broker = Broker::start("");
    let port = broker.port();
    let bom_topic = "\u{FEFF}cf4/bom";
    let mut plain = subscriber(port, "cf4-bom-plain", "cf4/bom", QoS::AtMostOnce).await;
    let mut bom = subscriber(port, "cf4-bom", bom_topic, QoS::AtMostOnce).await;
    publish_once(port, "cf4-bom-pub", bom_topic, b"b", false).await;
    let p = bom.expect_publish(WAIT).await;
    assert_eq!(
        &p.topic[..],
        bom_topic,
        "the BOM was stripped from the topic"
    );
    plain.expect_silence(QUIET).await;
}

/// MQTT-3.8.4-1: the server MUST respond to a SUBSCRIBE with a SUBACK, also when the
/// client's DISCONNECT follows in the same TCP segment (the subscription was applied but
/// its SUBACK was lost to the close); for a persistent session, whose SUBACK waits for
/// the subscription's commit, too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suback_is_sent_when_disconnect_follows_in_the_same_read_mqtt_3_8_4_1() {
    let broker = Broker::start("");
    for clean in [true, false] {
        let id = format!("sub-then-bye-{clean}");
        let (mut c, _) = connect(broker.port(), &id, clean).await;
        let mut both = encoded(
            &Packet::Subscribe(Subscribe {
                packet_id: 3,
                filters: vec![SubscribeFilter {
                    filter: "bye/#".into(),
                    options: sub_opts(QoS::AtLeastOnce),
                }],
                properties: Properties::default(),
            }),
            V4,
        );
        both.extend(encoded(
            &Packet::Disconnect(outpost_mqtt::Disconnect {
                reason: ReasonCode::NORMAL_DISCONNECTION,
                properties: Properties::default(),
            }),
            V4,
        ));
        c.send_bytes(&both).await;
        let got = c.expect_closed(WAIT).await;
        assert!(
            got.iter()
                .any(|p| matches!(p, Packet::SubAck(a) if a.packet_id == 3)),
            "clean={clean}: SUBACK before the close, got {got:?}"
        );
    }
}

/// A packet's bytes on the wire.
fn encoded(p: &Packet, protocol: Protocol) -> Vec<u8> {
    let mut b = bytes::BytesMut::new();
    outpost_mqtt::encode(p, protocol, &mut b).expect("encode");
    b.to_vec()
}
