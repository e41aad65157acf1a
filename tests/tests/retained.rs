//! Retained messages: stored and replayed with RETAIN=1, replaced, cleared by an empty
//! payload, 5.0 Retain Handling and Retain As Published.

use outpost_tests::cli::{MosquittoSub, mosquitto_pub};
use outpost_tests::{Broker, QUIET, V4Client, V5Client, WAIT};
use rumqttc::QoS as Q4;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::mqttbytes::v5::{Filter, RetainForwardRule};

async fn retain(port: u16, topic: &str, payload: &str) {
    let (mut p, _) =
        V4Client::connect(port, &format!("r-pub-{topic}-{}", payload.len()), |_| {}).await;
    p.client
        .publish(topic, Q4::AtLeastOnce, true, payload.to_string())
        .await
        .unwrap();
    p.expect_publish_done().await;
    p.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_message_sent_to_new_subscriber_with_retain_flag_mqtt_3_3_1_6() {
    let broker = Broker::start("");
    retain(broker.port(), "r/new", "kept").await;
    let (mut sub, _) = V4Client::connect(broker.port(), "r-new-sub", |_| {}).await;
    sub.client.subscribe("r/#", Q4::AtLeastOnce).await.unwrap();
    let p = sub.expect_publish(WAIT).await;
    assert_eq!(&p.payload[..], b"kept");
    assert_eq!(p.topic, "r/new");
    assert!(
        p.retain,
        "a retained message sent on subscribe must have RETAIN=1 (MQTT-3.3.1-8)"
    );
    assert_eq!(p.qos, Q4::AtLeastOnce);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_live_forwarding_clears_the_retain_flag_mqtt_3_3_1_9() {
    let broker = Broker::start("");
    let (mut sub, _) = V4Client::connect(broker.port(), "r-live-sub", |_| {}).await;
    sub.client
        .subscribe("r/live", Q4::AtLeastOnce)
        .await
        .unwrap();
    sub.expect_suback().await;
    retain(broker.port(), "r/live", "now").await;
    let p = sub.expect_publish(WAIT).await;
    assert_eq!(&p.payload[..], b"now");
    assert!(!p.retain, "an established 3.1.1 subscription gets RETAIN=0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_retained_message_replaces_older_mqtt_3_3_1_5() {
    let broker = Broker::start("");
    retain(broker.port(), "r/replace", "old").await;
    retain(broker.port(), "r/replace", "newer").await;
    let (mut sub, _) = V4Client::connect(broker.port(), "r-replace-sub", |_| {}).await;
    sub.client
        .subscribe("r/replace", Q4::AtLeastOnce)
        .await
        .unwrap();
    let mut got = sub.expect_publishes(1, WAIT).await;
    got.extend(sub.publishes_during(QUIET).await);
    assert_eq!(got.len(), 1, "only one retained message per topic: {got:?}");
    assert_eq!(&got[0].payload[..], b"newer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_retained_payload_clears_the_retained_message_mqtt_3_3_1_10() {
    let broker = Broker::start("");
    retain(broker.port(), "r/clear", "soon gone").await;
    retain(broker.port(), "r/clear", "").await;
    let (mut sub, _) = V4Client::connect(broker.port(), "r-clear-sub", |_| {}).await;
    sub.client
        .subscribe("r/clear", Q4::AtLeastOnce)
        .await
        .unwrap();
    sub.expect_suback().await;
    assert!(
        sub.next_publish(QUIET).await.is_none(),
        "a cleared retained message was delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_delivery_respects_subscription_qos() {
    let broker = Broker::start("");
    retain(broker.port(), "r/qos", "q").await;
    let (mut sub, _) = V4Client::connect(broker.port(), "r-qos-sub", |_| {}).await;
    sub.client.subscribe("r/qos", Q4::AtMostOnce).await.unwrap();
    let p = sub.expect_publish(WAIT).await;
    assert_eq!(p.qos, Q4::AtMostOnce);
    assert!(p.retain);
}

async fn subscribe_rh(sub: &mut V5Client, topic: &str, rule: RetainForwardRule) {
    let mut f = Filter::new(topic, Q5::AtLeastOnce);
    f.retain_forward_rule = rule;
    sub.client.subscribe_many(vec![f]).await.unwrap();
    sub.expect_suback().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_retain_handling_0_sends_on_every_subscribe_mqtt_3_3_1_9() {
    let broker = Broker::start("");
    retain(broker.port(), "r/rh0", "x").await;
    let (mut sub, _) = V5Client::connect(broker.port(), "r-rh0", |_| {}).await;
    subscribe_rh(&mut sub, "r/rh0", RetainForwardRule::OnEverySubscribe).await;
    assert!(sub.expect_publish(WAIT).await.retain);
    subscribe_rh(&mut sub, "r/rh0", RetainForwardRule::OnEverySubscribe).await;
    assert!(
        sub.expect_publish(WAIT).await.retain,
        "retain handling 0 resends on re-subscribe"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_retain_handling_1_sends_only_for_new_subscription_mqtt_3_3_1_10() {
    let broker = Broker::start("");
    retain(broker.port(), "r/rh1", "x").await;
    let (mut sub, _) = V5Client::connect(broker.port(), "r-rh1", |_| {}).await;
    subscribe_rh(&mut sub, "r/rh1", RetainForwardRule::OnNewSubscribe).await;
    assert!(sub.expect_publish(WAIT).await.retain);
    subscribe_rh(&mut sub, "r/rh1", RetainForwardRule::OnNewSubscribe).await;
    assert!(
        sub.next_publish(QUIET).await.is_none(),
        "retain handling 1: the subscription already existed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_retain_handling_2_never_sends_retained_mqtt_3_3_1_11() {
    let broker = Broker::start("");
    retain(broker.port(), "r/rh2", "x").await;
    let (mut sub, _) = V5Client::connect(broker.port(), "r-rh2", |_| {}).await;
    subscribe_rh(&mut sub, "r/rh2", RetainForwardRule::Never).await;
    assert!(
        sub.next_publish(QUIET).await.is_none(),
        "retain handling 2 must not send retained messages"
    );
    // The subscription itself works.
    retain(broker.port(), "r/rh2", "live").await;
    assert_eq!(&sub.expect_publish(WAIT).await.payload[..], b"live");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_retain_as_published_keeps_or_clears_the_flag_mqtt_3_3_1_12_13() {
    let broker = Broker::start("");
    let (mut rap, _) = V5Client::connect(broker.port(), "r-rap1", |_| {}).await;
    let mut f = Filter::new("r/rap", Q5::AtLeastOnce);
    f.preserve_retain = true;
    rap.client.subscribe_many(vec![f]).await.unwrap();
    rap.expect_suback().await;
    let (mut norap, _) = V5Client::connect(broker.port(), "r-rap0", |_| {}).await;
    norap
        .client
        .subscribe_many(vec![Filter::new("r/rap", Q5::AtLeastOnce)])
        .await
        .unwrap();
    norap.expect_suback().await;

    retain(broker.port(), "r/rap", "flagged").await;
    assert!(
        rap.expect_publish(WAIT).await.retain,
        "RAP=1 keeps RETAIN as published"
    );
    assert!(
        !norap.expect_publish(WAIT).await.retain,
        "RAP=0 clears RETAIN on forwarding"
    );

    let (publ, _) = V5Client::connect(broker.port(), "r-rap-pub", |_| {}).await;
    publ.client
        .publish("r/rap", Q5::AtLeastOnce, false, "plain")
        .await
        .unwrap();
    assert!(
        !rap.expect_publish(WAIT).await.retain,
        "RAP=1 with RETAIN=0 stays 0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_cli_retained_roundtrip() {
    let broker = Broker::start("");
    mosquitto_pub(broker.port(), "r/cli", "cli-retained", 1, true, false).await;
    let sub = MosquittoSub::start(broker.port(), "r/cli", 1, 1, 5, true).await;
    let msgs = sub.messages().await;
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(msgs[0].payload, "cli-retained");
    assert!(msgs[0].retain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_retained_message_expires_mqtt_3_3_2_5() {
    let broker = Broker::start("");
    let (mut p, _) = V5Client::connect(broker.port(), "r-exp-pub", |_| {}).await;
    let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
        message_expiry_interval: Some(1),
        ..Default::default()
    };
    p.client
        .publish_with_properties("r/exp", Q5::AtLeastOnce, true, "short", props)
        .await
        .unwrap();
    p.expect_publish_done().await;
    tokio::time::sleep(std::time::Duration::from_millis(2200)).await;
    let (mut sub, _) = V5Client::connect(broker.port(), "r-exp-sub", |_| {}).await;
    sub.client
        .subscribe("r/exp", Q5::AtLeastOnce)
        .await
        .unwrap();
    sub.expect_suback().await;
    assert!(
        sub.next_publish(QUIET).await.is_none(),
        "an expired retained message was delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_retained_message_keeps_its_properties() {
    let broker = Broker::start("");
    let (mut p, _) = V5Client::connect(broker.port(), "r-props-pub", |_| {}).await;
    let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
        content_type: Some("application/json".into()),
        user_properties: vec![("unit".into(), "degC".into())],
        response_topic: Some("r/props/reply".into()),
        ..Default::default()
    };
    p.client
        .publish_with_properties("r/props", Q5::AtLeastOnce, true, "{\"t\":21}", props)
        .await
        .unwrap();
    p.expect_publish_done().await;
    let (mut sub, _) = V5Client::connect(broker.port(), "r-props-sub", |_| {}).await;
    sub.client
        .subscribe("r/props", Q5::AtLeastOnce)
        .await
        .unwrap();
    let got = sub.expect_publish(WAIT).await;
    assert!(got.retain);
    let props = got
        .properties
        .expect("properties kept with the retained message");
    assert_eq!(props.content_type.as_deref(), Some("application/json"));
    assert_eq!(
        props.user_properties,
        vec![("unit".to_string(), "degC".to_string())]
    );
    assert_eq!(props.response_topic.as_deref(), Some("r/props/reply"));
}
