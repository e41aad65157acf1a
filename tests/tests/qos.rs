//! QoS 0/1/2 in both directions with rumqttc (3.1.1 and 5.0) and the Mosquitto CLI,
//! QoS downgrade, overlapping subscriptions, ordering and QoS 2 exactly-once.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use outpost_mqtt::{Packet, Properties, Protocol, PubResponse, QoS, ReasonCode};
use outpost_tests::cli::{MosquittoSub, mosquitto_pub};
use outpost_tests::raw::{connect_packet, publish, sub_opts};
use outpost_tests::{Broker, QUIET, RawClient, V4Client, V5Client, WAIT, mosquitto_mode};
use rumqttc::QoS as Q4;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::mqttbytes::v5::{Filter, SubscribeProperties};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_qos_0_1_2_delivered_at_published_qos() {
    let broker = Broker::start("");
    let (mut sub, _) = V4Client::connect(broker.port(), "q-v4-sub", |_| {}).await;
    sub.client.subscribe("q/v4", Q4::ExactlyOnce).await.unwrap();
    sub.expect_suback().await;
    let (mut publ, _) = V4Client::connect(broker.port(), "q-v4-pub", |_| {}).await;
    for (i, qos) in [Q4::AtMostOnce, Q4::AtLeastOnce, Q4::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        publ.client
            .publish("q/v4", qos, false, format!("m{i}"))
            .await
            .unwrap();
        if qos != Q4::AtMostOnce {
            publ.expect_publish_done().await;
        }
        let p = sub.expect_publish(WAIT).await;
        assert_eq!(p.payload, Bytes::from(format!("m{i}")));
        assert_eq!(
            p.qos, qos,
            "min(published, granted) must be the published QoS"
        );
        assert_eq!(p.topic, "q/v4");
        assert!(!p.retain);
    }
    assert!(sub.next_publish(QUIET).await.is_none(), "no duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_qos_0_1_2_delivered_at_published_qos() {
    let broker = Broker::start("");
    let (mut sub, _) = V5Client::connect(broker.port(), "q-v5-sub", |_| {}).await;
    sub.client.subscribe("q/v5", Q5::ExactlyOnce).await.unwrap();
    sub.expect_suback().await;
    let (mut publ, _) = V5Client::connect(broker.port(), "q-v5-pub", |_| {}).await;
    for (i, qos) in [Q5::AtMostOnce, Q5::AtLeastOnce, Q5::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        publ.client
            .publish("q/v5", qos, false, format!("m{i}"))
            .await
            .unwrap();
        if qos != Q5::AtMostOnce {
            publ.expect_publish_done().await;
        }
        let p = sub.expect_publish(WAIT).await;
        assert_eq!(p.payload, Bytes::from(format!("m{i}")));
        assert_eq!(p.qos, qos);
        assert_eq!(&p.topic[..], b"q/v5");
    }
    assert!(sub.next_publish(QUIET).await.is_none(), "no duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_and_v5_clients_exchange_messages_both_ways() {
    let broker = Broker::start("");
    let (mut s4, _) = V4Client::connect(broker.port(), "q-x-s4", |_| {}).await;
    s4.client
        .subscribe("q/x/to4", Q4::ExactlyOnce)
        .await
        .unwrap();
    s4.expect_suback().await;
    let (mut s5, _) = V5Client::connect(broker.port(), "q-x-s5", |_| {}).await;
    s5.client
        .subscribe("q/x/to5", Q5::ExactlyOnce)
        .await
        .unwrap();
    s5.expect_suback().await;

    s5.client
        .publish("q/x/to4", Q5::ExactlyOnce, false, "from5")
        .await
        .unwrap();
    s4.client
        .publish("q/x/to5", Q4::AtLeastOnce, false, "from4")
        .await
        .unwrap();
    let p4 = s4.expect_publish(WAIT).await;
    assert_eq!((&p4.payload[..], p4.qos), (&b"from5"[..], Q4::ExactlyOnce));
    let p5 = s5.expect_publish(WAIT).await;
    assert_eq!((&p5.payload[..], p5.qos), (&b"from4"[..], Q5::AtLeastOnce));
}

async fn cli_roundtrip(v5: bool) {
    let broker = Broker::start("");
    let topic = if v5 { "q/cli5" } else { "q/cli4" };
    let sub = MosquittoSub::start(broker.port(), topic, 2, 3, 10, v5).await;
    for qos in 0..3u8 {
        mosquitto_pub(broker.port(), topic, &format!("cli-{qos}"), qos, false, v5).await;
    }
    let msgs = sub.messages().await;
    let got: Vec<(u8, String)> = msgs.iter().map(|m| (m.qos, m.payload.clone())).collect();
    assert_eq!(
        got,
        vec![
            (0, "cli-0".into()),
            (1, "cli-1".into()),
            (2, "cli-2".into())
        ],
        "mosquitto_sub must get each message once, in order, at its QoS"
    );
    assert!(msgs.iter().all(|m| m.topic == topic && !m.retain));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_cli_v311_qos_0_1_2() {
    cli_roundtrip(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_cli_v5_qos_0_1_2() {
    cli_roundtrip(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_qos_is_min_of_published_and_granted_mqtt_3_8_4_6() {
    let broker = Broker::start("");
    let (mut s0, _) = V4Client::connect(broker.port(), "q-dg-0", |_| {}).await;
    s0.client.subscribe("q/dg", Q4::AtMostOnce).await.unwrap();
    s0.expect_suback().await;
    let (mut s1, _) = V5Client::connect(broker.port(), "q-dg-1", |_| {}).await;
    s1.client.subscribe("q/dg", Q5::AtLeastOnce).await.unwrap();
    s1.expect_suback().await;
    let (mut publ, _) = V4Client::connect(broker.port(), "q-dg-pub", |_| {}).await;
    publ.client
        .publish("q/dg", Q4::ExactlyOnce, false, "hi")
        .await
        .unwrap();
    publ.expect_publish_done().await;
    assert_eq!(s0.expect_publish(WAIT).await.qos, Q4::AtMostOnce);
    assert_eq!(s1.expect_publish(WAIT).await.qos, Q5::AtLeastOnce);
    publ.client
        .publish("q/dg", Q4::AtMostOnce, false, "lo")
        .await
        .unwrap();
    assert_eq!(
        s1.expect_publish(WAIT).await.qos,
        Q5::AtMostOnce,
        "QoS is never upgraded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_overlapping_subscriptions_use_the_max_qos_mqtt_3_3_5_1() {
    let broker = Broker::start("");
    let (mut sub, _) = V4Client::connect(broker.port(), "q-ov4", |_| {}).await;
    sub.client
        .subscribe("q/ov4/+", Q4::AtMostOnce)
        .await
        .unwrap();
    sub.expect_suback().await;
    sub.client
        .subscribe("q/ov4/#", Q4::ExactlyOnce)
        .await
        .unwrap();
    sub.expect_suback().await;
    let (mut publ, _) = V4Client::connect(broker.port(), "q-ov4-pub", |_| {}).await;
    publ.client
        .publish("q/ov4/x", Q4::ExactlyOnce, false, "ov")
        .await
        .unwrap();
    publ.expect_publish_done().await;
    let mut copies = sub.expect_publishes(1, WAIT).await;
    copies.extend(sub.publishes_during(Duration::from_millis(800)).await);
    assert!(
        (1..=2).contains(&copies.len()),
        "one copy (or at most one per matching subscription), got {}",
        copies.len()
    );
    assert!(
        copies.iter().any(|p| p.qos == Q4::ExactlyOnce),
        "the message must be delivered at the maximum QoS of the matching subscriptions: {copies:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_overlapping_subscriptions_carry_all_subscription_ids_mqtt_3_3_4_4() {
    let broker = Broker::start("");
    let (mut sub, _) = V5Client::connect(broker.port(), "q-ov5", |_| {}).await;
    for (filter, id, qos) in [
        ("q/ov5/+", 1usize, Q5::AtMostOnce),
        ("q/ov5/#", 2, Q5::ExactlyOnce),
    ] {
        let props = SubscribeProperties {
            id: Some(id),
            user_properties: vec![],
        };
        sub.client
            .subscribe_with_properties(filter, qos, props)
            .await
            .unwrap();
        sub.expect_suback().await;
    }
    let (mut publ, _) = V5Client::connect(broker.port(), "q-ov5-pub", |_| {}).await;
    publ.client
        .publish("q/ov5/x", Q5::ExactlyOnce, false, "ov")
        .await
        .unwrap();
    publ.expect_publish_done().await;
    let mut copies = sub.expect_publishes(1, WAIT).await;
    copies.extend(sub.publishes_during(Duration::from_millis(800)).await);
    let ids = |p: &rumqttc::v5::mqttbytes::v5::Publish| -> BTreeSet<usize> {
        p.properties
            .as_ref()
            .map(|pp| pp.subscription_identifiers.iter().copied().collect())
            .unwrap_or_default()
    };
    match copies.len() {
        1 => {
            // MQTT-3.3.4-4: a single copy carries the ids of all matching subscriptions,
            // and MQTT-3.3.4-2: at the maximum QoS.
            assert_eq!(ids(&copies[0]), BTreeSet::from([1, 2]), "{copies:?}");
            assert_eq!(copies[0].qos, Q5::ExactlyOnce);
        }
        2 if mosquitto_mode() => {
            // MQTT-3.3.4-5: one copy per subscription, each with its own id (Mosquitto's way).
            let all: BTreeSet<Vec<usize>> = copies
                .iter()
                .map(|p| ids(p).into_iter().collect())
                .collect();
            assert_eq!(all, BTreeSet::from([vec![1], vec![2]]));
        }
        n => panic!(
            "outpost must send exactly one copy for overlapping subscriptions, got {n}: {copies:?}"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_messages_keep_publish_order_mqtt_4_6_0_6() {
    let broker = Broker::start("");
    let (mut sub, _) = V5Client::connect(broker.port(), "q-order-sub", |_| {}).await;
    sub.client
        .subscribe("q/order", Q5::AtLeastOnce)
        .await
        .unwrap();
    sub.expect_suback().await;
    let (publ, _) = V5Client::connect(broker.port(), "q-order-pub", |_| {}).await;
    for i in 0..100u32 {
        publ.client
            .publish("q/order", Q5::AtLeastOnce, false, i.to_string())
            .await
            .unwrap();
    }
    for i in 0..100u32 {
        let p = sub.expect_publish(WAIT).await;
        assert_eq!(
            p.payload,
            Bytes::from(i.to_string()),
            "message {i} out of order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_match_per_topic_rules_mqtt_4_7() {
    let broker = Broker::start("");
    let (mut sub, _) = V5Client::connect(broker.port(), "q-wild", |_| {}).await;
    sub.client
        .subscribe_many(vec![
            Filter::new("q/w/+/temp", Q5::AtLeastOnce),
            Filter::new("q/w2/#", Q5::AtLeastOnce),
        ])
        .await
        .unwrap();
    sub.expect_suback().await;
    let (mut publ, _) = V5Client::connect(broker.port(), "q-wild-pub", |_| {}).await;
    for t in [
        "q/w/a/temp",
        "q/w/a/b/temp",
        "q/w/temp",
        "q/w2",
        "q/w2/x/y",
        "q/w3",
    ] {
        publ.client
            .publish(t, Q5::AtLeastOnce, false, t)
            .await
            .unwrap();
        publ.expect_publish_done().await;
    }
    let mut got = sub.expect_publishes(3, WAIT).await;
    got.extend(sub.publishes_during(QUIET).await);
    let got: Vec<String> = got
        .iter()
        .map(|p| String::from_utf8_lossy(&p.topic).to_string())
        .collect();
    // "#" also matches the parent level (MQTT-4.7.1-2); "+" matches exactly one level.
    assert_eq!(got, vec!["q/w/a/temp", "q/w2", "q/w2/x/y"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_stops_delivery_mqtt_3_10_4_2() {
    let broker = Broker::start("");
    let (mut sub, _) = V4Client::connect(broker.port(), "q-unsub", |_| {}).await;
    sub.client
        .subscribe("q/unsub", Q4::AtLeastOnce)
        .await
        .unwrap();
    sub.expect_suback().await;
    sub.client.unsubscribe("q/unsub").await.unwrap();
    let got = sub
        .wait_for(WAIT, |p| {
            matches!(p, rumqttc::Packet::UnsubAck(_)).then_some(())
        })
        .await;
    assert!(got.is_some(), "no UNSUBACK");
    let (mut publ, _) = V4Client::connect(broker.port(), "q-unsub-pub", |_| {}).await;
    publ.client
        .publish("q/unsub", Q4::AtLeastOnce, false, "gone")
        .await
        .unwrap();
    publ.expect_publish_done().await;
    assert!(sub.next_publish(QUIET).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_duplicate_before_pubrel_is_delivered_once_mqtt_4_3_3_3() {
    let broker = Broker::start("");
    let (mut sub, _) = V4Client::connect(broker.port(), "q-eo-sub", |_| {}).await;
    sub.client.subscribe("q/eo", Q4::ExactlyOnce).await.unwrap();
    sub.expect_suback().await;

    let (mut raw, _) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V3_1_1, "q-eo-raw", true),
    )
    .await;
    let mut first = publish("q/eo", QoS::ExactlyOnce, Some(7), b"one");
    raw.send(&Packet::Publish(first.clone())).await;
    expect_pubrec(&mut raw, 7).await;
    first.dup = true;
    raw.send(&Packet::Publish(first)).await;
    expect_pubrec(&mut raw, 7).await;
    raw.send(&Packet::PubRel(PubResponse::new(7))).await;
    match raw.expect_packet(WAIT).await {
        Packet::PubComp(c) => assert_eq!(c.packet_id, 7),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
    let mut copies = sub.expect_publishes(1, WAIT).await;
    copies.extend(sub.publishes_during(Duration::from_millis(800)).await);
    assert_eq!(
        copies.len(),
        1,
        "QoS 2 message delivered {} times",
        copies.len()
    );
    assert_eq!(&copies[0].payload[..], b"one");

    // After PUBREL the packet id is free: the same id now means a new message.
    raw.send(&Packet::Publish(publish(
        "q/eo",
        QoS::ExactlyOnce,
        Some(7),
        b"two",
    )))
    .await;
    expect_pubrec(&mut raw, 7).await;
    raw.send(&Packet::PubRel(PubResponse::new(7))).await;
    match raw.expect_packet(WAIT).await {
        Packet::PubComp(c) => assert_eq!(c.packet_id, 7),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
    let p = sub.expect_publish(WAIT).await;
    assert_eq!(&p.payload[..], b"two");
    assert!(sub.next_publish(QUIET).await.is_none());
}

async fn expect_pubrec(raw: &mut RawClient, id: u16) {
    match raw.expect_packet(WAIT).await {
        Packet::PubRec(r) => {
            assert_eq!(r.packet_id, id);
            assert!(!r.reason.is_error(), "PUBREC reason {:?}", r.reason);
        }
        other => panic!("expected PUBREC {id}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_suback_grants_requested_qos_and_puback_reports_no_subscribers() {
    let broker = Broker::start("");
    let (mut raw, _) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V5, "q-suback", true),
    )
    .await;
    for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        let rc = raw
            .subscribe(
                i as u16 + 1,
                &format!("q/suback/{i}"),
                sub_opts(qos),
                Properties::default(),
            )
            .await;
        assert_eq!(rc, ReasonCode(qos as u8), "granted QoS");
    }
    raw.send(&Packet::Publish(publish(
        "q/nobody",
        QoS::AtLeastOnce,
        Some(9),
        b"x",
    )))
    .await;
    match raw.expect_packet(WAIT).await {
        // 0x00 or 0x10 (no matching subscribers) are both successes.
        Packet::PubAck(a) => {
            assert_eq!(a.packet_id, 9);
            assert!(
                a.reason == ReasonCode::SUCCESS || a.reason == ReasonCode::NO_MATCHING_SUBSCRIBERS,
                "{:?}",
                a.reason
            );
        }
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_payload_roundtrip_is_intact() {
    let broker = Broker::start("");
    // rumqttc's own default limit is 10 KiB in both directions.
    let (mut sub, _) = V5Client::connect(broker.port(), "q-large-sub", |o| {
        o.set_max_packet_size(Some(1 << 20));
    })
    .await;
    sub.client
        .subscribe("q/large", Q5::AtLeastOnce)
        .await
        .unwrap();
    sub.expect_suback().await;
    let (mut publ, _) = V4Client::connect(broker.port(), "q-large-pub", |o| {
        o.set_max_packet_size(1 << 20, 1 << 20);
    })
    .await;
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    publ.client
        .publish("q/large", Q4::AtLeastOnce, false, payload.clone())
        .await
        .unwrap();
    publ.expect_publish_done().await;
    let p = sub.expect_publish(WAIT).await;
    assert_eq!(p.payload.len(), payload.len());
    assert!(p.payload[..] == payload[..], "payload corrupted in transit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_publishers_lose_nothing_and_keep_per_publisher_order() {
    const PUBLISHERS: usize = 10;
    const EACH: usize = 50;
    let broker = Broker::start("");
    let port = broker.port();
    let (mut sub, _) = V4Client::connect(port, "q-many-sub", |_| {}).await;
    sub.client
        .subscribe("q/many/+", Q4::AtLeastOnce)
        .await
        .unwrap();
    sub.expect_suback().await;
    let mut tasks = Vec::new();
    for n in 0..PUBLISHERS {
        tasks.push(tokio::spawn(async move {
            let (mut p, _) = V4Client::connect(port, &format!("q-many-{n}"), |_| {}).await;
            for i in 0..EACH {
                p.client
                    .publish(
                        format!("q/many/{n}"),
                        Q4::AtLeastOnce,
                        false,
                        format!("{n}:{i}"),
                    )
                    .await
                    .unwrap();
            }
            for _ in 0..EACH {
                p.expect_publish_done().await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("publisher task");
    }
    let mut next = [0usize; PUBLISHERS];
    for _ in 0..PUBLISHERS * EACH {
        let p = sub.expect_publish(WAIT).await;
        let text = String::from_utf8_lossy(&p.payload).to_string();
        let (n, i) = text.split_once(':').expect("n:i payload");
        let (n, i): (usize, usize) = (n.parse().unwrap(), i.parse().unwrap());
        assert_eq!(i, next[n], "publisher {n}: message {i} out of order");
        next[n] += 1;
    }
    assert!(
        sub.next_publish(QUIET).await.is_none(),
        "duplicates delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_pubrel_for_unknown_packet_id_gets_pubcomp_mqtt_4_3_3_11() {
    let broker = Broker::start("");
    let (mut raw, _) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V5, "q-relunk", true),
    )
    .await;
    raw.send(&Packet::PubRel(PubResponse::new(77))).await;
    match raw.expect_packet(WAIT).await {
        Packet::PubComp(c) => {
            assert_eq!(c.packet_id, 77);
            // 0x92 reports the session mismatch; 0x00 is also allowed (Mosquitto sends it).
            assert!(
                c.reason == ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
                    || c.reason == ReasonCode::SUCCESS,
                "PUBCOMP reason {:?}",
                c.reason
            );
        }
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_unsubscribe_reports_missing_subscription_0x11() {
    let broker = Broker::start("");
    let (mut raw, _) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V5, "q-unsub5", true),
    )
    .await;
    raw.subscribe(
        1,
        "q/unsub5/a",
        sub_opts(QoS::AtMostOnce),
        Properties::default(),
    )
    .await;
    raw.send(&Packet::Unsubscribe(outpost_mqtt::Unsubscribe {
        packet_id: 2,
        filters: vec!["q/unsub5/a".into(), "q/unsub5/never".into()],
        properties: Properties::default(),
    }))
    .await;
    match raw.expect_packet(WAIT).await {
        Packet::UnsubAck(a) => {
            assert_eq!(a.packet_id, 2);
            assert_eq!(
                a.reason_codes,
                vec![ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED]
            );
        }
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suback_codes_follow_filter_order_mqtt_3_9_3_1() {
    let broker = Broker::start("");
    let (mut raw, _) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V3_1_1, "q-suborder", true),
    )
    .await;
    let filters = [
        ("q/so/2", QoS::ExactlyOnce),
        ("q/so/0", QoS::AtMostOnce),
        ("q/so/1", QoS::AtLeastOnce),
    ];
    raw.send(&Packet::Subscribe(outpost_mqtt::Subscribe {
        packet_id: 3,
        filters: filters
            .iter()
            .map(|(f, q)| outpost_mqtt::SubscribeFilter {
                filter: f.to_string(),
                options: sub_opts(*q),
            })
            .collect(),
        properties: Properties::default(),
    }))
    .await;
    match raw.expect_packet(WAIT).await {
        Packet::SubAck(a) => {
            assert_eq!(a.packet_id, 3);
            assert_eq!(
                a.reason_codes,
                vec![ReasonCode(2), ReasonCode(0), ReasonCode(1)]
            );
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribing_replaces_the_subscription_mqtt_3_8_4_3() {
    let broker = Broker::start("");
    let (mut sub, _) = V4Client::connect(broker.port(), "q-resub", |_| {}).await;
    sub.client
        .subscribe("q/resub", Q4::AtMostOnce)
        .await
        .unwrap();
    sub.expect_suback().await;
    sub.client
        .subscribe("q/resub", Q4::ExactlyOnce)
        .await
        .unwrap();
    sub.expect_suback().await;
    let (mut publ, _) = V4Client::connect(broker.port(), "q-resub-pub", |_| {}).await;
    publ.client
        .publish("q/resub", Q4::ExactlyOnce, false, "x")
        .await
        .unwrap();
    publ.expect_publish_done().await;
    let mut got = sub.expect_publishes(1, WAIT).await;
    got.extend(sub.publishes_during(QUIET).await);
    assert_eq!(
        got.len(),
        1,
        "the second SUBSCRIBE must replace, not add: {got:?}"
    );
    assert_eq!(got[0].qos, Q4::ExactlyOnce, "the new QoS applies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_levels_and_leading_slash_are_distinct_topics_mqtt_4_7_1_3() {
    let broker = Broker::start("");
    let (mut sub, _) = V4Client::connect(broker.port(), "q-levels", |_| {}).await;
    sub.client.subscribe("+/lv", Q4::AtLeastOnce).await.unwrap();
    sub.expect_suback().await;
    let (mut publ, _) = V4Client::connect(broker.port(), "q-levels-pub", |_| {}).await;
    for t in ["lv", "/lv", "x/lv", "x//lv"] {
        publ.client
            .publish(t, Q4::AtLeastOnce, false, t)
            .await
            .unwrap();
        publ.expect_publish_done().await;
    }
    let mut got = sub.expect_publishes(2, WAIT).await;
    got.extend(sub.publishes_during(QUIET).await);
    let topics: Vec<&str> = got.iter().map(|p| p.topic.as_str()).collect();
    assert_eq!(topics, vec!["/lv", "x/lv"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sys_topics_are_not_matched_by_leading_wildcards_mqtt_4_7_2_1() {
    let broker = Broker::start("sys_interval = \"1s\"");
    let (mut all, _) = V4Client::connect(broker.port(), "q-sys-all", |_| {}).await;
    all.client.subscribe("#", Q4::AtMostOnce).await.unwrap();
    all.expect_suback().await;
    let (mut plus, _) = V4Client::connect(broker.port(), "q-sys-plus", |_| {}).await;
    plus.client
        .subscribe("+/broker/#", Q4::AtMostOnce)
        .await
        .unwrap();
    plus.expect_suback().await;
    let (mut sys, _) = V4Client::connect(broker.port(), "q-sys", |_| {}).await;
    sys.client
        .subscribe("$SYS/#", Q4::AtMostOnce)
        .await
        .unwrap();
    sys.expect_suback().await;
    let p = sys.expect_publish(Duration::from_secs(4)).await;
    assert!(p.topic.starts_with("$SYS/"), "{}", p.topic);
    for c in [&mut all, &mut plus] {
        let leaked: Vec<String> = c
            .publishes_during(Duration::from_millis(1500))
            .await
            .into_iter()
            .map(|p| p.topic)
            .filter(|t| t.starts_with('$'))
            .collect();
        assert!(
            leaked.is_empty(),
            "$ topics matched a wildcard filter: {leaked:?}"
        );
    }
}

/// `$SYS` is the broker's: a client's PUBLISH there is refused (5.0: 0x87; 3.1.1 has no
/// refusal, so it is acknowledged and dropped, as Mosquitto does) and no subscriber sees
/// a forged statistic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_cannot_publish_into_sys() {
    if mosquitto_mode() {
        return;
    }
    let broker = Broker::start("");
    let (mut watch, _) = V4Client::connect(broker.port(), "q-sysw-watch", |_| {}).await;
    watch
        .client
        .subscribe("$SYS/forged/#", Q4::AtMostOnce)
        .await
        .unwrap();
    watch.expect_suback().await;

    let (mut c5, _) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V5, "q-sysw-5", true),
    )
    .await;
    c5.send(&Packet::Publish(publish(
        "$SYS/forged/clients",
        QoS::AtLeastOnce,
        Some(1),
        b"0",
    )))
    .await;
    match c5.expect_packet(WAIT).await {
        Packet::PubAck(a) => assert_eq!(a.reason, ReasonCode::NOT_AUTHORIZED, "{a:?}"),
        other => panic!("expected PUBACK, got {other:?}"),
    }

    let (mut c4, _) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V3_1_1, "q-sysw-4", true),
    )
    .await;
    c4.send(&Packet::Publish(publish(
        "$SYS/forged/uptime",
        QoS::AtLeastOnce,
        Some(1),
        b"0",
    )))
    .await;
    assert!(matches!(c4.expect_packet(WAIT).await, Packet::PubAck(_)));

    let seen = watch.publishes_during(QUIET).await;
    assert!(seen.is_empty(), "a client wrote into $SYS: {seen:?}");
}
