//! Will messages: published on abnormal disconnect and keep-alive expiry, not on a
//! normal DISCONNECT; 5.0 DISCONNECT 0x04 and the Will Delay Interval.

use std::time::{Duration, Instant};

use outpost_mqtt::{Disconnect, Packet, Properties, Protocol, QoS, ReasonCode};
use outpost_tests::raw::{connect_packet, will};
use outpost_tests::{Broker, QUIET, RawClient, V4Client, V5Client, WAIT, mosquitto_mode};
use rumqttc::QoS as Q4;

async fn watcher(port: u16, id: &str, topic: &str) -> V4Client {
    let (mut w, _) = V4Client::connect(port, id, |_| {}).await;
    w.client.subscribe(topic, Q4::AtLeastOnce).await.unwrap();
    w.expect_suback().await;
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_will_published_when_socket_drops_mqtt_3_1_2_8() {
    let broker = Broker::start("");
    let mut w = watcher(broker.port(), "w-drop-watch", "w/drop").await;
    let mut c = connect_packet(Protocol::V3_1_1, "w-drop", true);
    c.will = Some(will("w/drop", "gone", QoS::AtLeastOnce, false));
    let (raw, _) = RawClient::connect(broker.port(), c).await;
    raw.drop_abruptly();
    let p = w.expect_publish(WAIT).await;
    assert_eq!(&p.payload[..], b"gone");
    assert_eq!(p.qos, Q4::AtLeastOnce);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_rumqttc_will_published_when_client_vanishes_mqtt_3_1_2_8() {
    let broker = Broker::start("");
    let mut w = watcher(broker.port(), "w-v5-watch", "w/v5").await;
    let (c, _) = V5Client::connect(broker.port(), "w-v5", |o| {
        o.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
            "w/v5",
            "v5 gone",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            None,
        ));
    })
    .await;
    c.drop_abruptly();
    assert_eq!(&w.expect_publish(WAIT).await.payload[..], b"v5 gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_will_not_published_on_normal_disconnect_mqtt_3_14_4_3() {
    let broker = Broker::start("");
    let mut w = watcher(broker.port(), "w-norm4-watch", "w/norm4").await;
    let (c, _) = V4Client::connect(broker.port(), "w-norm4", |o| {
        o.set_last_will(rumqttc::LastWill::new(
            "w/norm4",
            "must not",
            Q4::AtLeastOnce,
            false,
        ));
    })
    .await;
    c.disconnect().await;
    assert!(
        w.next_publish(Duration::from_secs(1)).await.is_none(),
        "will published after DISCONNECT"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_will_not_published_on_disconnect_0x00_mqtt_3_1_2_8() {
    let broker = Broker::start("");
    let mut w = watcher(broker.port(), "w-norm5-watch", "w/norm5").await;
    let mut c = connect_packet(Protocol::V5, "w-norm5", true);
    c.will = Some(will("w/norm5", "must not", QoS::AtLeastOnce, false));
    let (mut raw, _) = RawClient::connect(broker.port(), c).await;
    raw.disconnect().await;
    assert!(
        raw.closed_within(WAIT).await,
        "server must close after DISCONNECT"
    );
    assert!(
        w.next_publish(Duration::from_secs(1)).await.is_none(),
        "will published after DISCONNECT 0x00"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_disconnect_with_will_message_0x04_publishes_the_will() {
    let broker = Broker::start("");
    let mut w = watcher(broker.port(), "w-04-watch", "w/04").await;
    let mut c = connect_packet(Protocol::V5, "w-04", true);
    c.will = Some(will("w/04", "asked for", QoS::AtLeastOnce, false));
    let (mut raw, _) = RawClient::connect(broker.port(), c).await;
    raw.send(&Packet::Disconnect(Disconnect {
        reason: ReasonCode::DISCONNECT_WITH_WILL_MESSAGE,
        properties: Properties::default(),
    }))
    .await;
    assert_eq!(&w.expect_publish(WAIT).await.payload[..], b"asked for");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_will_is_stored_as_retained_mqtt_3_1_2_17() {
    let broker = Broker::start("");
    let mut c = connect_packet(Protocol::V3_1_1, "w-ret", true);
    c.will = Some(will("w/ret", "offline", QoS::AtLeastOnce, true));
    let (raw, _) = RawClient::connect(broker.port(), c).await;
    raw.drop_abruptly();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut late, _) = V4Client::connect(broker.port(), "w-ret-late", |_| {}).await;
    late.client
        .subscribe("w/ret", Q4::AtLeastOnce)
        .await
        .unwrap();
    let p = late.expect_publish(WAIT).await;
    assert_eq!(&p.payload[..], b"offline");
    assert!(
        p.retain,
        "a will with RETAIN=1 becomes the retained message"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_will_delay_interval_delays_the_will_mqtt_3_1_3_9() {
    let broker = Broker::start("");
    let mut w = watcher(broker.port(), "w-delay-watch", "w/delay").await;
    let mut c = connect_packet(Protocol::V5, "w-delay", true);
    c.properties.session_expiry_interval = Some(30);
    let mut wl = will("w/delay", "late", QoS::AtLeastOnce, false);
    wl.properties.will_delay_interval = Some(2);
    c.will = Some(wl);
    let (raw, _) = RawClient::connect(broker.port(), c).await;
    let dropped = Instant::now();
    raw.drop_abruptly();
    assert!(
        w.next_publish(Duration::from_millis(1200)).await.is_none(),
        "will published before its 2 s delay"
    );
    let p = w.expect_publish(Duration::from_secs(4)).await;
    assert_eq!(&p.payload[..], b"late");
    let after = dropped.elapsed();
    assert!(
        after >= Duration::from_millis(1800),
        "will came after {after:?}, delay was 2 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_reconnect_within_will_delay_cancels_the_will_mqtt_3_1_3_9() {
    let broker = Broker::start("");
    let mut w = watcher(broker.port(), "w-cancel-watch", "w/cancel").await;
    let mut c = connect_packet(Protocol::V5, "w-cancel", false);
    c.properties.session_expiry_interval = Some(60);
    let mut wl = will("w/cancel", "must not", QoS::AtLeastOnce, false);
    wl.properties.will_delay_interval = Some(2);
    c.will = Some(wl);
    let (raw, _) = RawClient::connect(broker.port(), c.clone()).await;
    raw.drop_abruptly();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut again = c;
    again.will = None;
    let (_raw2, ack) = RawClient::connect(broker.port(), again).await;
    assert!(ack.session_present);
    assert!(
        w.next_publish(Duration::from_secs(3)).await.is_none(),
        "will published although the client came back within the delay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_expiry_after_one_and_a_half_times_publishes_will_mqtt_3_1_2_24() {
    let broker = Broker::start("");
    let mut w = watcher(broker.port(), "w-ka-watch", "w/ka").await;
    let mut c = connect_packet(Protocol::V3_1_1, "w-ka", true);
    c.keep_alive = 1;
    c.will = Some(will("w/ka", "timed out", QoS::AtLeastOnce, false));
    let (mut raw, _) = RawClient::connect(broker.port(), c).await;
    let silent_since = Instant::now();
    // 1.5 x 1 s, plus scheduling slack. Mosquitto 2.0.11 checks keep alives coarsely
    // (about 4 s here), so validation mode allows it more.
    let bound = if mosquitto_mode() {
        Duration::from_secs(6)
    } else {
        Duration::from_secs(4)
    };
    assert!(
        raw.closed_within(bound).await,
        "silent client not disconnected within {bound:?}"
    );
    let took = silent_since.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "disconnected after {took:?}, before the keep alive elapsed"
    );
    assert_eq!(&w.expect_publish(WAIT).await.payload[..], b"timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_is_satisfied_by_pingreq_mqtt_3_1_2_23() {
    let broker = Broker::start("");
    let mut c = connect_packet(Protocol::V5, "w-ka-ping", true);
    c.keep_alive = 1;
    let (mut raw, _) = RawClient::connect(broker.port(), c).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        raw.send(&Packet::PingReq).await;
        assert_eq!(raw.expect_packet_raw(WAIT).await, Packet::PingResp);
    }
    raw.expect_silence(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_will_properties_are_forwarded_mqtt_3_1_3_10() {
    let broker = Broker::start("");
    let (mut w, _) = V5Client::connect(broker.port(), "w-props-watch", |_| {}).await;
    w.client
        .subscribe("w/props", rumqttc::v5::mqttbytes::QoS::ExactlyOnce)
        .await
        .unwrap();
    w.expect_suback().await;
    let mut c = connect_packet(Protocol::V5, "w-props", true);
    let mut wl = will("w/props", "bye", QoS::ExactlyOnce, false);
    wl.properties.content_type = Some("text/plain".into());
    wl.properties.user_properties = vec![("why".into(), "crash".into())];
    wl.properties.payload_format_indicator = Some(1);
    c.will = Some(wl);
    let (raw, _) = RawClient::connect(broker.port(), c).await;
    raw.drop_abruptly();
    let p = w.expect_publish(WAIT).await;
    assert_eq!(&p.payload[..], b"bye");
    assert_eq!(p.qos, rumqttc::v5::mqttbytes::QoS::ExactlyOnce);
    let props = p.properties.expect("will properties forwarded");
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        props.user_properties,
        vec![("why".to_string(), "crash".to_string())]
    );
    assert_eq!(props.payload_format_indicator, Some(1));
}
