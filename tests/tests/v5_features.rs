//! MQTT 5.0 features: server keep alive, topic aliases, message expiry, no local,
//! property pass-through, maximum packet size, receive maximum, subscription identifiers.

use std::time::Duration;

use bytes::Bytes;
use outpost_mqtt::{Packet, Properties, Protocol, QoS, ReasonCode};
use outpost_tests::raw::{connect_packet, publish, sub_opts};
use outpost_tests::{Broker, QUIET, RawClient, V5Client, WAIT, mosquitto_mode};
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::mqttbytes::v5::{Filter, PublishProperties, SubscribeProperties};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_keep_alive_caps_the_client_request_mqtt_3_2_2_21() {
    let broker = Broker::start("max_keepalive = 10");
    let mut c = connect_packet(Protocol::V5, "v5-ska", true);
    c.keep_alive = 60;
    let (_raw, ack) = RawClient::connect(broker.port(), c).await;
    assert_eq!(ack.reason, ReasonCode::SUCCESS);
    assert_eq!(
        ack.properties.server_keep_alive,
        Some(10),
        "CONNACK must carry Server Keep Alive 10"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_topic_alias_is_resolved_mqtt_3_3_2_12() {
    let broker = Broker::start("");
    let (mut sub, _) = V5Client::connect(broker.port(), "v5-alias-sub", |_| {}).await;
    sub.client
        .subscribe("v5/alias/#", Q5::AtLeastOnce)
        .await
        .unwrap();
    sub.expect_suback().await;

    let (mut raw, ack) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V5, "v5-alias-pub", true),
    )
    .await;
    let max = ack.properties.topic_alias_maximum.unwrap_or(0);
    assert!(
        max >= 1,
        "broker should accept topic aliases (Topic Alias Maximum {max})"
    );
    let mut first = publish("v5/alias/long/topic/name", QoS::AtLeastOnce, Some(1), b"a");
    first.properties.topic_alias = Some(1);
    raw.send(&Packet::Publish(first)).await;
    let mut second = publish("", QoS::AtLeastOnce, Some(2), b"b");
    second.properties.topic_alias = Some(1);
    raw.send(&Packet::Publish(second)).await;
    for _ in 0..2 {
        assert!(matches!(raw.expect_packet(WAIT).await, Packet::PubAck(_)));
    }
    for want in [b"a", b"b"] {
        let p = sub.expect_publish(WAIT).await;
        assert_eq!(&p.payload[..], want);
        assert_eq!(&p.topic[..], b"v5/alias/long/topic/name");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_alias_above_maximum_is_disconnected_0x94_mqtt_3_3_2_10() {
    let broker = Broker::start("");
    let (mut raw, ack) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V5, "v5-alias-bad", true),
    )
    .await;
    let max = ack.properties.topic_alias_maximum.unwrap_or(0);
    let mut p = publish("v5/alias/bad", QoS::AtMostOnce, None, b"x");
    p.properties.topic_alias = Some(max.saturating_add(1));
    raw.send(&Packet::Publish(p)).await;
    assert_eq!(
        raw.expect_closed_with_disconnect(WAIT).await,
        Some(ReasonCode::TOPIC_ALIAS_INVALID)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_topic_alias_with_empty_topic_is_a_protocol_error_mqtt_3_3_4() {
    let broker = Broker::start("");
    let (mut raw, _) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V5, "v5-alias-unk", true),
    )
    .await;
    let mut p = publish("", QoS::AtMostOnce, None, b"x");
    p.properties.topic_alias = Some(1);
    raw.send(&Packet::Publish(p)).await;
    assert_eq!(
        raw.expect_closed_with_disconnect(WAIT).await,
        Some(ReasonCode::PROTOCOL_ERROR)
    );
}

/// Receive `n` publishes, resolving outbound topic aliases as a client must.
async fn recv_resolving_aliases(
    raw: &mut RawClient,
    n: usize,
    max: u16,
) -> Vec<(String, Option<u16>)> {
    let mut aliases = std::collections::HashMap::new();
    let mut out = Vec::new();
    for _ in 0..n {
        let p = raw.expect_publish(WAIT).await;
        let alias = p.properties.topic_alias;
        if let Some(a) = alias {
            assert!(
                a >= 1 && a <= max,
                "server used alias {a}, client maximum is {max} (MQTT-3.1.2-26)"
            );
            if !p.topic.is_empty() {
                aliases.insert(a, p.topic.to_string());
            }
        }
        let topic = if p.topic.is_empty() {
            aliases
                .get(&alias.expect("empty topic without alias"))
                .cloned()
                .expect("alias used before it was set")
        } else {
            p.topic.to_string()
        };
        out.push((topic, alias));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_topic_aliases_stay_within_client_maximum_mqtt_3_1_2_26() {
    let broker = Broker::start("");
    let mut c = connect_packet(Protocol::V5, "v5-oalias", true);
    c.properties.topic_alias_maximum = Some(2);
    let (mut raw, _) = RawClient::connect(broker.port(), c).await;
    raw.subscribe(
        1,
        "v5/oalias/#",
        sub_opts(QoS::AtMostOnce),
        Properties::default(),
    )
    .await;
    let (publ, _) = V5Client::connect(broker.port(), "v5-oalias-pub", |_| {}).await;
    let topics = [
        "v5/oalias/a",
        "v5/oalias/b",
        "v5/oalias/a",
        "v5/oalias/c",
        "v5/oalias/a",
        "v5/oalias/b",
    ];
    for t in topics {
        publ.client
            .publish(t, Q5::AtMostOnce, false, t)
            .await
            .unwrap();
    }
    let got = recv_resolving_aliases(&mut raw, topics.len(), 2).await;
    let resolved: Vec<&str> = got.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        resolved, topics,
        "aliased topics must resolve to the published ones"
    );
    if !mosquitto_mode() {
        // Outpost uses outbound aliases when allowed (Mosquitto 2.0 never does): repeats
        // of an aliased topic go out with an empty topic name.
        let aliased_repeats = got.iter().filter(|(_, a)| a.is_some()).count();
        assert!(
            aliased_repeats >= 4,
            "expected aliases on a, b and their repeats: {got:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_outbound_topic_alias_without_client_maximum_mqtt_3_1_2_27() {
    let broker = Broker::start("");
    let (mut raw, _) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V5, "v5-noalias", true),
    )
    .await;
    raw.subscribe(
        1,
        "v5/noalias",
        sub_opts(QoS::AtMostOnce),
        Properties::default(),
    )
    .await;
    let (publ, _) = V5Client::connect(broker.port(), "v5-noalias-pub", |_| {}).await;
    for _ in 0..3 {
        publ.client
            .publish("v5/noalias", Q5::AtMostOnce, false, "x")
            .await
            .unwrap();
    }
    for _ in 0..3 {
        let p = raw.expect_publish(WAIT).await;
        assert_eq!(p.properties.topic_alias, None);
        assert_eq!(&p.topic[..], "v5/noalias");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_message_expires_and_remaining_expiry_is_decremented_mqtt_3_3_2_5_and_6() {
    let broker = Broker::start("");
    let mut c = connect_packet(Protocol::V5, "v5-expiry", false);
    c.properties.session_expiry_interval = Some(60);
    let (mut raw, _) = RawClient::connect(broker.port(), c.clone()).await;
    raw.subscribe(
        1,
        "v5/expiry",
        sub_opts(QoS::AtLeastOnce),
        Properties::default(),
    )
    .await;
    raw.disconnect().await;
    drop(raw);

    let (mut publ, _) = V5Client::connect(broker.port(), "v5-expiry-pub", |_| {}).await;
    for (payload, expiry) in [("short", 1u32), ("long", 60)] {
        let props = PublishProperties {
            message_expiry_interval: Some(expiry),
            ..Default::default()
        };
        publ.client
            .publish_with_properties("v5/expiry", Q5::AtLeastOnce, false, payload, props)
            .await
            .unwrap();
        publ.expect_publish_done().await;
    }
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let (mut raw, ack) = RawClient::connect(broker.port(), c).await;
    assert!(ack.session_present);
    let p = raw.expect_publish(WAIT).await;
    assert_eq!(
        &p.payload[..],
        b"long",
        "the expired message must not be delivered"
    );
    let left = p
        .properties
        .message_expiry_interval
        .expect("expiry must be forwarded");
    assert!(
        (50..=58).contains(&left),
        "remaining expiry {left}, expected 60 minus ~2 s waited"
    );
    raw.puback(p.packet_id.unwrap()).await;
    raw.expect_silence(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_local_subscription_skips_own_messages_mqtt_3_8_3_3() {
    let broker = Broker::start("");
    let (mut me, _) = V5Client::connect(broker.port(), "v5-nolocal", |_| {}).await;
    let mut f = Filter::new("v5/nolocal", Q5::AtLeastOnce);
    f.nolocal = true;
    me.client.subscribe_many(vec![f]).await.unwrap();
    me.expect_suback().await;
    me.client
        .publish("v5/nolocal", Q5::AtLeastOnce, false, "mine")
        .await
        .unwrap();
    let (other, _) = V5Client::connect(broker.port(), "v5-nolocal-other", |_| {}).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    other
        .client
        .publish("v5/nolocal", Q5::AtLeastOnce, false, "theirs")
        .await
        .unwrap();
    // "mine" was published first, so if it were delivered it would come before "theirs".
    let mut got = me.expect_publishes(1, WAIT).await;
    got.extend(me.publishes_during(QUIET).await);
    let payloads: Vec<&[u8]> = got.iter().map(|p| &p.payload[..]).collect();
    assert_eq!(
        payloads,
        vec![&b"theirs"[..]],
        "no-local must drop only the client's own messages"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_properties_are_forwarded_unaltered_mqtt_3_3_2_4_15_16_17_18_20() {
    let broker = Broker::start("");
    let (mut sub, _) = V5Client::connect(broker.port(), "v5-props-sub", |_| {}).await;
    sub.client
        .subscribe("v5/props", Q5::AtLeastOnce)
        .await
        .unwrap();
    sub.expect_suback().await;
    let (mut publ, _) = V5Client::connect(broker.port(), "v5-props-pub", |_| {}).await;
    let user = vec![
        ("a".to_string(), "1".to_string()),
        ("b".to_string(), "2".to_string()),
        ("a".to_string(), "3".to_string()),
    ];
    let props = PublishProperties {
        payload_format_indicator: Some(1),
        response_topic: Some("v5/props/reply".into()),
        correlation_data: Some(Bytes::from_static(&[0, 1, 2, 0xff])),
        content_type: Some("application/json".into()),
        user_properties: user.clone(),
        ..Default::default()
    };
    publ.client
        .publish_with_properties("v5/props", Q5::AtLeastOnce, false, "{\"v\":1}", props)
        .await
        .unwrap();
    publ.expect_publish_done().await;
    let p = sub.expect_publish(WAIT).await;
    let got = p.properties.expect("properties must be forwarded");
    assert_eq!(got.payload_format_indicator, Some(1));
    assert_eq!(got.response_topic.as_deref(), Some("v5/props/reply"));
    assert_eq!(
        got.correlation_data.as_deref(),
        Some(&[0u8, 1, 2, 0xff][..])
    );
    assert_eq!(got.content_type.as_deref(), Some("application/json"));
    assert_eq!(
        got.user_properties, user,
        "user properties unaltered and in order"
    );
    assert_eq!(&p.payload[..], b"{\"v\":1}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_larger_than_client_maximum_packet_size_is_not_sent_mqtt_3_1_2_25() {
    let broker = Broker::start("");
    let mut c = connect_packet(Protocol::V5, "v5-maxpkt", true);
    c.properties.maximum_packet_size = Some(200);
    let (mut raw, _) = RawClient::connect(broker.port(), c).await;
    raw.subscribe(
        1,
        "v5/maxpkt",
        sub_opts(QoS::AtLeastOnce),
        Properties::default(),
    )
    .await;
    let (mut publ, _) = V5Client::connect(broker.port(), "v5-maxpkt-pub", |_| {}).await;
    publ.client
        .publish("v5/maxpkt", Q5::AtLeastOnce, false, vec![b'x'; 1000])
        .await
        .unwrap();
    publ.expect_publish_done().await;
    publ.client
        .publish("v5/maxpkt", Q5::AtLeastOnce, false, "small")
        .await
        .unwrap();
    publ.expect_publish_done().await;
    let p = raw.expect_publish(WAIT).await;
    assert_eq!(
        &p.payload[..],
        b"small",
        "the oversize message must be dropped for this client"
    );
    raw.puback(p.packet_id.unwrap()).await;
    raw.expect_silence(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_oversize_inbound_packet_gets_disconnect_0x95_mqtt_3_2_2_15() {
    let broker = Broker::start("max_packet_size = 1024");
    let (mut raw, ack) =
        RawClient::connect(broker.port(), connect_packet(Protocol::V5, "v5-big", true)).await;
    assert_eq!(
        ack.properties.maximum_packet_size,
        Some(1024),
        "CONNACK must announce Maximum Packet Size"
    );
    raw.send(&Packet::Publish(publish(
        "v5/big",
        QoS::AtLeastOnce,
        Some(1),
        &[b'y'; 2000],
    )))
    .await;
    assert_eq!(
        raw.expect_closed_with_disconnect(WAIT).await,
        Some(ReasonCode::PACKET_TOO_LARGE)
    );
    outpost_tests::assert_broker_serves(broker.port(), "v5-big").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_oversize_inbound_packet_closes_the_connection() {
    let broker = Broker::start("max_packet_size = 1024");
    let (mut raw, _) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V3_1_1, "v4-big", true),
    )
    .await;
    raw.send(&Packet::Publish(publish(
        "v4/big",
        QoS::AtLeastOnce,
        Some(1),
        &[b'y'; 2000],
    )))
    .await;
    let got = raw.expect_closed(WAIT).await;
    assert!(
        !got.iter().any(|p| matches!(p, Packet::PubAck(_))),
        "oversize PUBLISH acknowledged: {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_maximum_is_announced_and_enforced_with_0x93_mqtt_3_3_4_and_4_9() {
    let broker = Broker::start("receive_maximum = 5");
    let (mut raw, ack) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V5, "v5-recvmax", true),
    )
    .await;
    assert_eq!(
        ack.properties.receive_maximum,
        Some(5),
        "CONNACK must announce Receive Maximum 5"
    );
    for id in 1..=6u16 {
        raw.send(&Packet::Publish(publish(
            "v5/recvmax",
            QoS::ExactlyOnce,
            Some(id),
            b"q2",
        )))
        .await;
    }
    if mosquitto_mode() {
        // Mosquitto 2.0.11 deviates: it answers the 6th with PUBREC 0x97 (quota exceeded)
        // and keeps the connection. Check the first five were accepted and stop there.
        for id in 1..=5u16 {
            match raw.expect_packet(WAIT).await {
                Packet::PubRec(r) => assert_eq!((r.packet_id, r.reason), (id, ReasonCode::SUCCESS)),
                other => panic!("expected PUBREC {id}, got {other:?}"),
            }
        }
        return;
    }
    let got = raw.expect_closed(WAIT).await;
    let pubrecs = got
        .iter()
        .filter(|p| matches!(p, Packet::PubRec(_)))
        .count();
    assert!(pubrecs <= 5, "at most 5 PUBRECs before the limit: {got:?}");
    let reason = got.iter().rev().find_map(|p| match p {
        Packet::Disconnect(d) => Some(d.reason),
        _ => None,
    });
    assert_eq!(
        reason,
        Some(ReasonCode::RECEIVE_MAXIMUM_EXCEEDED),
        "{got:?}"
    );
}

/// A client still sending when the broker ends its connection must still read why. Here,
/// as in the Paho interoperability suite's flow-control test, the client answers each
/// PUBREC with a PUBREL until it reads the DISCONNECT: the broker keeps reading (and
/// dropping) after its DISCONNECT, so those writes do not fail with a broken pipe before
/// the client gets to the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_still_sending_after_0x93_reads_the_disconnect_without_a_broken_pipe() {
    outpost_tests::outpost_only!();
    let broker = Broker::start("receive_maximum = 5");
    for round in 0..5 {
        let (mut raw, _) = RawClient::connect(
            broker.port(),
            connect_packet(Protocol::V5, &format!("v5-linger-{round}"), true),
        )
        .await;
        let mut burst = bytes::BytesMut::new();
        for id in 1..=6u16 {
            let p = Packet::Publish(publish("v5/linger", QoS::ExactlyOnce, Some(id), b"q2"));
            outpost_mqtt::encode(&p, Protocol::V5, &mut burst).unwrap();
        }
        raw.send_bytes(&burst).await;
        let mut pubrecs = 0;
        let reason = loop {
            match raw.recv(WAIT).await {
                Ok(Packet::PubRec(r)) => {
                    pubrecs += 1;
                    // Give the broker time to close, so a write to a dead socket fails.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let mut rel = bytes::BytesMut::new();
                    let p = Packet::PubRel(outpost_mqtt::PubResponse::new(r.packet_id));
                    outpost_mqtt::encode(&p, Protocol::V5, &mut rel).unwrap();
                    assert!(
                        raw.try_send_bytes(&rel).await,
                        "round {round}: PUBREL {pubrecs} hit a closed socket"
                    );
                }
                Ok(Packet::Disconnect(d)) => break d.reason,
                other => panic!("round {round}: expected PUBREC or DISCONNECT, got {other:?}"),
            }
        };
        assert_eq!(
            reason,
            ReasonCode::RECEIVE_MAXIMUM_EXCEEDED,
            "round {round}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_qos2_flows_free_receive_maximum_slots() {
    let broker = Broker::start("receive_maximum = 5");
    let (mut raw, _) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V5, "v5-recvok", true),
    )
    .await;
    for id in 1..=12u16 {
        raw.send(&Packet::Publish(publish(
            "v5/recvok",
            QoS::ExactlyOnce,
            Some(id),
            b"q2",
        )))
        .await;
        match raw.expect_packet(WAIT).await {
            Packet::PubRec(r) => assert_eq!(r.packet_id, id),
            other => panic!("expected PUBREC, got {other:?}"),
        }
        raw.send(&Packet::PubRel(outpost_mqtt::PubResponse::new(id)))
            .await;
        match raw.expect_packet(WAIT).await {
            Packet::PubComp(c) => assert_eq!(c.packet_id, id),
            other => panic!("expected PUBCOMP, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_identifier_is_returned_with_matching_publishes_mqtt_3_3_4_3() {
    let broker = Broker::start("");
    let (mut sub, _) = V5Client::connect(broker.port(), "v5-subid", |_| {}).await;
    let props = SubscribeProperties {
        id: Some(4242),
        user_properties: vec![],
    };
    sub.client
        .subscribe_with_properties("v5/subid/+", Q5::AtLeastOnce, props)
        .await
        .unwrap();
    sub.expect_suback().await;
    sub.client
        .subscribe("v5/subid-none", Q5::AtLeastOnce)
        .await
        .unwrap();
    sub.expect_suback().await;
    sub.client
        .publish("v5/subid/x", Q5::AtLeastOnce, false, "x")
        .await
        .unwrap();
    let p = sub.expect_publish(WAIT).await;
    assert_eq!(
        p.properties.map(|pp| pp.subscription_identifiers),
        Some(vec![4242])
    );
    sub.client
        .publish("v5/subid-none", Q5::AtLeastOnce, false, "y")
        .await
        .unwrap();
    let p = sub.expect_publish(WAIT).await;
    let ids = p
        .properties
        .map(|pp| pp.subscription_identifiers)
        .unwrap_or_default();
    assert!(
        ids.is_empty(),
        "no identifier was given for this subscription: {ids:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_suback_rejects_invalid_filter_or_closes() {
    let broker = Broker::start("");
    let (mut raw, _) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V5, "v5-badfilter", true),
    )
    .await;
    // "a/#/b" breaks MQTT-4.7.1-1; the codec refuses to encode it, so craft the bytes.
    let mut body = vec![0x00, 0x01, 0x00];
    body.extend(outpost_tests::raw::bytes_of::string(b"a/#/b"));
    body.push(0x01);
    raw.send_bytes(&outpost_tests::raw::bytes_of::packet(0x82, &body))
        .await;
    match raw.recv(WAIT).await {
        Ok(Packet::SubAck(a)) => assert_eq!(a.reason_codes, vec![ReasonCode::TOPIC_FILTER_INVALID]),
        Ok(Packet::Disconnect(d)) => assert!(
            [
                ReasonCode::MALFORMED_PACKET,
                ReasonCode::PROTOCOL_ERROR,
                ReasonCode::TOPIC_FILTER_INVALID
            ]
            .contains(&d.reason),
            "{d:?}"
        ),
        Err(outpost_tests::raw::RawError::Closed) => {}
        other => panic!("invalid filter must be refused, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resent_messages_do_not_reuse_aliases_of_the_old_connection_mqtt_3_3_2_7() {
    let broker = Broker::start("");
    let mut c = connect_packet(Protocol::V5, "v5-alias-resume", false);
    c.properties.session_expiry_interval = Some(60);
    c.properties.topic_alias_maximum = Some(5);
    let (mut raw, _) = RawClient::connect(broker.port(), c.clone()).await;
    raw.subscribe(
        1,
        "v5/alias-resume",
        sub_opts(QoS::AtLeastOnce),
        Properties::default(),
    )
    .await;
    let (mut publ, _) = V5Client::connect(broker.port(), "v5-alias-resume-pub", |_| {}).await;
    for payload in ["first", "second"] {
        publ.client
            .publish("v5/alias-resume", Q5::AtLeastOnce, false, payload)
            .await
            .unwrap();
        publ.expect_publish_done().await;
    }
    let before = recv_resolving_aliases(&mut raw, 2, 5).await;
    assert!(before.iter().all(|(t, _)| t == "v5/alias-resume"));
    raw.drop_abruptly(); // no PUBACKs

    // Alias mappings end with the network connection: the resends must be resolvable
    // from scratch (recv_resolving_aliases starts with an empty alias table).
    let (mut raw, ack) = RawClient::connect(broker.port(), c).await;
    assert!(ack.session_present);
    let mut aliases = std::collections::HashMap::new();
    for want in [&b"first"[..], &b"second"[..]] {
        let p = raw.expect_publish(WAIT).await;
        assert!(p.dup, "resend must have DUP=1");
        assert_eq!(&p.payload[..], want);
        let topic = if p.topic.is_empty() {
            let a = p.properties.topic_alias.expect("empty topic without alias");
            aliases
                .get(&a)
                .cloned()
                .unwrap_or_else(|| panic!("resend used alias {a} from the previous connection"))
        } else {
            if let Some(a) = p.properties.topic_alias {
                aliases.insert(a, p.topic.to_string());
            }
            p.topic.to_string()
        };
        assert_eq!(topic, "v5/alias-resume");
        raw.puback(p.packet_id.expect("QoS 1")).await;
    }
}

/// 5.0 section 3.4.2.1: a server that knows nobody subscribes MAY answer 0x10 (No
/// matching subscribers) instead of 0x00, as Mosquitto, EMQX and HiveMQ do. It is still
/// a success: the QoS 2 exchange goes on to PUBCOMP, and a retained message is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puback_says_no_matching_subscribers_when_nobody_subscribes() {
    if mosquitto_mode() {
        return;
    }
    let broker = Broker::start("");
    let (mut c, _) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V5, "v5-nms-pub", true),
    )
    .await;
    c.send(&Packet::Publish(publish(
        "v5/nms/a",
        QoS::AtLeastOnce,
        Some(1),
        b"1",
    )))
    .await;
    match c.expect_packet(WAIT).await {
        Packet::PubAck(a) => assert_eq!(a.reason, ReasonCode::NO_MATCHING_SUBSCRIBERS),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    let mut retained = publish("v5/nms/a", QoS::ExactlyOnce, Some(2), b"kept");
    retained.retain = true;
    c.send(&Packet::Publish(retained)).await;
    match c.expect_packet(WAIT).await {
        Packet::PubRec(r) => assert_eq!(r.reason, ReasonCode::NO_MATCHING_SUBSCRIBERS),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    c.send(&Packet::PubRel(outpost_mqtt::PubResponse::new(2)))
        .await;
    assert!(matches!(c.expect_packet(WAIT).await, Packet::PubComp(p) if p.packet_id == 2));

    // A subscriber (here through a wildcard) makes it a plain success; it also gets the
    // retained message, so 0x10 did not mean "dropped".
    let (mut s, _) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V5, "v5-nms-sub", true),
    )
    .await;
    let granted = s
        .subscribe(
            1,
            "v5/nms/+",
            sub_opts(QoS::AtLeastOnce),
            Properties::default(),
        )
        .await;
    assert_eq!(granted, ReasonCode::GRANTED_QOS_1);
    let kept = s.expect_publish(WAIT).await;
    assert_eq!(&kept.payload[..], b"kept");
    c.send(&Packet::Publish(publish(
        "v5/nms/a",
        QoS::AtLeastOnce,
        Some(3),
        b"3",
    )))
    .await;
    match c.expect_packet(WAIT).await {
        Packet::PubAck(a) => assert_eq!(a.reason, ReasonCode::SUCCESS),
        other => panic!("expected PUBACK, got {other:?}"),
    }
}
