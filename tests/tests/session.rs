//! Persistent sessions: session present, offline queues, subscriptions that survive a
//! reconnect, session expiry, and retransmission of unacknowledged messages on resume.

use outpost_mqtt::{Packet, Properties, Protocol, PubResponse, QoS, ReasonCode};
use outpost_tests::raw::{connect_packet, sub_opts};
use outpost_tests::{Broker, QUIET, RawClient, V4Client, V5Client, WAIT};
use rumqttc::QoS as Q4;
use rumqttc::v5::mqttbytes::QoS as Q5;

async fn v4_publish(port: u16, id: &str, topic: &str, msgs: &[(&str, Q4)]) {
    let (mut p, _) = V4Client::connect(port, id, |_| {}).await;
    for (payload, qos) in msgs {
        p.client
            .publish(topic, *qos, false, payload.to_string())
            .await
            .unwrap();
        if *qos != Q4::AtMostOnce {
            p.expect_publish_done().await;
        }
    }
    p.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_persistent_session_queues_qos1_and_qos2_while_offline_mqtt_3_1_2_4() {
    let broker = Broker::start("");
    let port = broker.port();
    let (mut sub, ack) = V4Client::connect(port, "s-v4-persist", |o| {
        o.set_clean_session(false);
    })
    .await;
    assert!(!ack.session_present, "first connect has no session");
    sub.client
        .subscribe("s/v4/q", Q4::ExactlyOnce)
        .await
        .unwrap();
    sub.expect_suback().await;
    sub.disconnect().await;

    v4_publish(
        port,
        "s-v4-pub",
        "s/v4/q",
        &[
            ("one", Q4::AtLeastOnce),
            ("two", Q4::ExactlyOnce),
            ("three", Q4::AtLeastOnce),
        ],
    )
    .await;

    let (mut sub, ack) = V4Client::connect(port, "s-v4-persist", |o| {
        o.set_clean_session(false);
    })
    .await;
    assert!(
        ack.session_present,
        "session present must be 1 on resume (MQTT-3.2.2-2)"
    );
    let mut got = Vec::new();
    for _ in 0..3 {
        let p = sub.expect_publish(WAIT).await;
        got.push((String::from_utf8_lossy(&p.payload).to_string(), p.qos));
    }
    assert_eq!(
        got,
        vec![
            ("one".to_string(), Q4::AtLeastOnce),
            ("two".to_string(), Q4::ExactlyOnce),
            ("three".to_string(), Q4::AtLeastOnce)
        ],
        "offline messages must arrive once each, in order, at their QoS"
    );
    assert!(
        sub.next_publish(QUIET).await.is_none(),
        "no duplicates expected"
    );

    // The subscription survived: a new message arrives without resubscribing.
    v4_publish(port, "s-v4-pub2", "s/v4/q", &[("four", Q4::AtLeastOnce)]).await;
    let p = sub.expect_publish(WAIT).await;
    assert_eq!(&p.payload[..], b"four");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_clean_session_discards_the_previous_session_mqtt_3_1_2_6() {
    let broker = Broker::start("");
    let port = broker.port();
    let (mut sub, _) = V4Client::connect(port, "s-v4-clean", |o| {
        o.set_clean_session(false);
    })
    .await;
    sub.client
        .subscribe("s/v4/clean", Q4::AtLeastOnce)
        .await
        .unwrap();
    sub.expect_suback().await;
    sub.disconnect().await;

    let (c, ack) = V4Client::connect(port, "s-v4-clean", |o| {
        o.set_clean_session(true);
    })
    .await;
    assert!(!ack.session_present, "clean session must report no session");
    c.disconnect().await;

    let (mut sub, ack) = V4Client::connect(port, "s-v4-clean", |o| {
        o.set_clean_session(false);
    })
    .await;
    assert!(
        !ack.session_present,
        "the old session must be gone after a clean session"
    );
    v4_publish(
        port,
        "s-v4-clean-pub",
        "s/v4/clean",
        &[("x", Q4::AtLeastOnce)],
    )
    .await;
    assert!(
        sub.next_publish(QUIET).await.is_none(),
        "the discarded subscription still delivers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_session_with_expiry_is_resumed_with_offline_messages_mqtt_3_1_2_23() {
    let broker = Broker::start("");
    let port = broker.port();
    let persistent = |o: &mut rumqttc::v5::MqttOptions| {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(60));
    };
    let (mut sub, ack) = V5Client::connect(port, "s-v5-persist", persistent).await;
    assert!(!ack.session_present);
    sub.client
        .subscribe("s/v5/q", Q5::ExactlyOnce)
        .await
        .unwrap();
    sub.expect_suback().await;
    sub.disconnect().await;

    let (mut publ, _) = V5Client::connect(port, "s-v5-pub", |_| {}).await;
    for (payload, qos) in [("a", Q5::AtLeastOnce), ("b", Q5::ExactlyOnce)] {
        publ.client
            .publish("s/v5/q", qos, false, payload)
            .await
            .unwrap();
        publ.expect_publish_done().await;
    }

    let (mut sub, ack) = V5Client::connect(port, "s-v5-persist", persistent).await;
    assert!(ack.session_present, "session present must be 1 on resume");
    let a = sub.expect_publish(WAIT).await;
    let b = sub.expect_publish(WAIT).await;
    assert_eq!((&a.payload[..], a.qos), (&b"a"[..], Q5::AtLeastOnce));
    assert_eq!((&b.payload[..], b.qos), (&b"b"[..], Q5::ExactlyOnce));

    publ.client
        .publish("s/v5/q", Q5::AtLeastOnce, false, "c")
        .await
        .unwrap();
    let c = sub.expect_publish(WAIT).await;
    assert_eq!(
        &c.payload[..],
        b"c",
        "subscription must persist in the session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_session_expiry_zero_ends_session_at_disconnect_mqtt_3_1_2_11() {
    let broker = Broker::start("");
    let port = broker.port();
    let (mut sub, _) = V5Client::connect(port, "s-v5-exp0", |o| {
        o.set_clean_start(false);
        o.set_session_expiry_interval(None);
    })
    .await;
    sub.client
        .subscribe("s/v5/exp0", Q5::AtLeastOnce)
        .await
        .unwrap();
    sub.expect_suback().await;
    sub.disconnect().await;
    let (_sub, ack) = V5Client::connect(port, "s-v5-exp0", |o| {
        o.set_clean_start(false);
    })
    .await;
    assert!(
        !ack.session_present,
        "a session with expiry 0 must not outlive its connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_unacked_qos1_publish_is_resent_with_dup_and_same_id_mqtt_4_4_0_1() {
    let broker = Broker::start("");
    let port = broker.port();
    let mut connect = connect_packet(Protocol::V5, "s-v5-redeliver", false);
    connect.properties.session_expiry_interval = Some(60);
    let (mut raw, _) = RawClient::connect(port, connect.clone()).await;
    assert_eq!(
        raw.subscribe(
            1,
            "s/v5/redeliver",
            sub_opts(QoS::AtLeastOnce),
            Properties::default()
        )
        .await,
        ReasonCode::GRANTED_QOS_1
    );

    let (mut publ, _) = V5Client::connect(port, "s-v5-redeliver-pub", |_| {}).await;
    publ.client
        .publish("s/v5/redeliver", Q5::AtLeastOnce, false, "once")
        .await
        .unwrap();
    publ.expect_publish_done().await;

    let first = raw.expect_publish(WAIT).await;
    assert!(!first.dup, "first delivery must have DUP=0 (MQTT-3.3.1-2)");
    let id = first.packet_id.expect("QoS 1 has a packet id");
    raw.drop_abruptly(); // no PUBACK

    let (mut raw, ack) = RawClient::connect(port, connect).await;
    assert!(ack.session_present);
    let again = raw.expect_publish(WAIT).await;
    assert!(again.dup, "re-delivery must have DUP=1 (MQTT-3.3.1-1)");
    assert_eq!(
        again.packet_id,
        Some(id),
        "re-delivery must reuse the packet id"
    );
    assert_eq!(&again.payload[..], b"once");
    assert_eq!(&again.topic[..], "s/v5/redeliver");
    raw.puback(id).await;
    raw.expect_silence(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_unacked_qos1_publish_is_resent_with_dup_and_same_id_mqtt_4_4_0_1() {
    let broker = Broker::start("");
    let port = broker.port();
    let connect = connect_packet(Protocol::V3_1_1, "s-v4-redeliver", false);
    let (mut raw, _) = RawClient::connect(port, connect.clone()).await;
    raw.subscribe(
        1,
        "s/v4/redeliver",
        sub_opts(QoS::AtLeastOnce),
        Properties::default(),
    )
    .await;
    v4_publish(
        port,
        "s-v4-redeliver-pub",
        "s/v4/redeliver",
        &[("once", Q4::AtLeastOnce)],
    )
    .await;
    let first = raw.expect_publish(WAIT).await;
    let id = first.packet_id.expect("packet id");
    raw.drop_abruptly();

    let (mut raw, ack) = RawClient::connect(port, connect).await;
    assert!(ack.session_present);
    let again = raw.expect_publish(WAIT).await;
    assert!(again.dup, "re-delivery must have DUP=1");
    assert_eq!(again.packet_id, Some(id));
    assert_eq!(&again.payload[..], b"once");
    raw.puback(id).await;
    raw.expect_silence(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_qos2_resume_after_pubrec_resends_pubrel_not_publish_mqtt_4_4_0_1() {
    let broker = Broker::start("");
    let port = broker.port();
    let mut connect = connect_packet(Protocol::V5, "s-v5-pubrel", false);
    connect.properties.session_expiry_interval = Some(60);
    let (mut raw, _) = RawClient::connect(port, connect.clone()).await;
    raw.subscribe(
        1,
        "s/v5/pubrel",
        sub_opts(QoS::ExactlyOnce),
        Properties::default(),
    )
    .await;

    let (mut publ, _) = V5Client::connect(port, "s-v5-pubrel-pub", |_| {}).await;
    publ.client
        .publish("s/v5/pubrel", Q5::ExactlyOnce, false, "x2")
        .await
        .unwrap();
    publ.expect_publish_done().await;

    let p = raw.expect_publish(WAIT).await;
    assert_eq!(p.qos, QoS::ExactlyOnce);
    let id = p.packet_id.expect("packet id");
    raw.send(&Packet::PubRec(PubResponse::new(id))).await;
    match raw.expect_packet(WAIT).await {
        Packet::PubRel(r) => assert_eq!(r.packet_id, id),
        other => panic!("expected PUBREL, got {other:?}"),
    }
    raw.drop_abruptly(); // no PUBCOMP

    let (mut raw, ack) = RawClient::connect(port, connect).await;
    assert!(ack.session_present);
    match raw.expect_packet(WAIT).await {
        Packet::PubRel(r) => assert_eq!(r.packet_id, id, "PUBREL must reuse the packet id"),
        other => panic!("expected the PUBREL to be resent, got {other:?}"),
    }
    raw.send(&Packet::PubComp(PubResponse::new(id))).await;
    raw.expect_silence(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_takeover_with_clean_session_0_keeps_the_session_mqtt_3_1_4_2() {
    // A persistent session taken over by a new connection keeps its subscriptions.
    let broker = Broker::start("");
    let port = broker.port();
    let (mut a, _) = V4Client::connect(port, "s-take-keep", |o| {
        o.set_clean_session(false);
    })
    .await;
    a.client
        .subscribe("s/take/keep", Q4::AtLeastOnce)
        .await
        .unwrap();
    a.expect_suback().await;
    let (mut b, ack) = V4Client::connect(port, "s-take-keep", |o| {
        o.set_clean_session(false);
    })
    .await;
    assert!(
        ack.session_present,
        "takeover with clean session 0 resumes the session"
    );
    assert!(a.wait_closed(WAIT).await.is_some());
    v4_publish(
        port,
        "s-take-keep-pub",
        "s/take/keep",
        &[("kept", Q4::AtLeastOnce)],
    )
    .await;
    let p = b.expect_publish(WAIT).await;
    assert_eq!(&p.payload[..], b"kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_session_is_discarded_after_its_expiry_interval_mqtt_4_1_0_1() {
    let broker = Broker::start("");
    let port = broker.port();
    let opts = |o: &mut rumqttc::v5::MqttOptions| {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(1));
    };
    let (mut sub, _) = V5Client::connect(port, "s-v5-expire", opts).await;
    sub.client
        .subscribe("s/v5/expire", Q5::AtLeastOnce)
        .await
        .unwrap();
    sub.expect_suback().await;
    sub.disconnect().await;
    tokio::time::sleep(std::time::Duration::from_millis(2300)).await;
    let (_sub, ack) = V5Client::connect(port, "s-v5-expire", opts).await;
    assert!(
        !ack.session_present,
        "the session outlived its 1 s expiry interval"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_inbound_qos2_is_exactly_once_across_publisher_reconnect_mqtt_4_3_3() {
    let broker = Broker::start("");
    let port = broker.port();
    let (mut sub, _) = V4Client::connect(port, "s-eo-sub", |_| {}).await;
    sub.client.subscribe("s/eo", Q4::ExactlyOnce).await.unwrap();
    sub.expect_suback().await;

    let connect = connect_packet(Protocol::V3_1_1, "s-eo-pub", false);
    let (mut raw, _) = RawClient::connect(port, connect.clone()).await;
    let mut msg = outpost_tests::raw::publish("s/eo", QoS::ExactlyOnce, Some(11), b"once only");
    raw.send(&Packet::Publish(msg.clone())).await;
    match raw.expect_packet(WAIT).await {
        Packet::PubRec(r) => assert_eq!(r.packet_id, 11),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    raw.drop_abruptly(); // before PUBREL

    // The publisher cannot know the PUBREC arrived, so it resends the PUBLISH (DUP=1).
    let (mut raw, ack) = RawClient::connect(port, connect).await;
    assert!(ack.session_present);
    msg.dup = true;
    raw.send(&Packet::Publish(msg)).await;
    match raw.expect_packet(WAIT).await {
        Packet::PubRec(r) => assert_eq!(r.packet_id, 11),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    raw.send(&Packet::PubRel(PubResponse::new(11))).await;
    match raw.expect_packet(WAIT).await {
        Packet::PubComp(c) => assert_eq!(c.packet_id, 11),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
    let mut got = sub.expect_publishes(1, WAIT).await;
    got.extend(sub.publishes_during(QUIET).await);
    assert_eq!(
        got.len(),
        1,
        "QoS 2 message delivered {} times: {got:?}",
        got.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_respects_client_receive_maximum_mqtt_3_3_4_9() {
    let broker = Broker::start("");
    let port = broker.port();
    let mut c = connect_packet(Protocol::V5, "s-rm-sub", true);
    c.properties.receive_maximum = Some(2);
    let (mut raw, _) = RawClient::connect(port, c).await;
    raw.subscribe(1, "s/rm", sub_opts(QoS::AtLeastOnce), Properties::default())
        .await;
    let (mut publ, _) = V5Client::connect(port, "s-rm-pub", |_| {}).await;
    for i in 0..5 {
        publ.client
            .publish("s/rm", Q5::AtLeastOnce, false, i.to_string())
            .await
            .unwrap();
        publ.expect_publish_done().await;
    }
    let mut inflight = vec![
        raw.expect_publish(WAIT).await,
        raw.expect_publish(WAIT).await,
    ];
    raw.expect_silence(QUIET).await; // a third would exceed Receive Maximum 2
    let mut seen = Vec::new();
    while let Some(p) = inflight.first().cloned() {
        inflight.remove(0);
        seen.push(String::from_utf8_lossy(&p.payload).to_string());
        raw.puback(p.packet_id.expect("QoS 1")).await;
        if seen.len() + inflight.len() < 5 {
            inflight.push(raw.expect_publish(WAIT).await);
        }
    }
    assert_eq!(seen, ["0", "1", "2", "3", "4"]);
    raw.expect_silence(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_disconnect_can_end_the_session_with_expiry_zero_mqtt_3_14_2() {
    let broker = Broker::start("");
    let mut c = connect_packet(Protocol::V5, "s-dis-exp", false);
    c.properties.session_expiry_interval = Some(60);
    let (mut raw, _) = RawClient::connect(broker.port(), c.clone()).await;
    raw.subscribe(
        1,
        "s/dis-exp",
        sub_opts(QoS::AtLeastOnce),
        Properties::default(),
    )
    .await;
    let props = Properties {
        session_expiry_interval: Some(0),
        ..Properties::default()
    };
    raw.send(&Packet::Disconnect(outpost_mqtt::Disconnect {
        reason: ReasonCode::NORMAL_DISCONNECTION,
        properties: props,
    }))
    .await;
    assert!(raw.closed_within(WAIT).await);
    let (_raw, ack) = RawClient::connect(broker.port(), c).await;
    assert!(
        !ack.session_present,
        "DISCONNECT with expiry 0 must end the session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_disconnect_cannot_revive_a_zero_expiry_session_mqtt_3_14_2_2() {
    let broker = Broker::start("");
    let c = connect_packet(Protocol::V5, "s-dis-revive", false);
    let (mut raw, _) = RawClient::connect(broker.port(), c.clone()).await;
    let props = Properties {
        session_expiry_interval: Some(60),
        ..Properties::default()
    };
    raw.send(&Packet::Disconnect(outpost_mqtt::Disconnect {
        reason: ReasonCode::NORMAL_DISCONNECTION,
        properties: props,
    }))
    .await;
    let got = raw.expect_closed(WAIT).await;
    for p in &got {
        match p {
            Packet::Disconnect(d) => assert_eq!(d.reason, ReasonCode::PROTOCOL_ERROR),
            other => panic!("unexpected {other:?}"),
        }
    }
    let (_raw, ack) = RawClient::connect(broker.port(), c).await;
    assert!(
        !ack.session_present,
        "a session with expiry 0 was kept alive by DISCONNECT"
    );
}
