//! Shared subscriptions (`$share/{group}/{filter}`, MQTT 5.0 section 4.8.2).

use std::collections::BTreeSet;
use std::time::Duration;

use outpost_tests::{Broker, QUIET, V4Client, V5Client, WAIT};
use rumqttc::v5::mqttbytes::QoS as Q5;

const N: usize = 20;

async fn member(port: u16, id: &str, filter: &str) -> V5Client {
    let (mut c, _) = V5Client::connect(port, id, |_| {}).await;
    c.client.subscribe(filter, Q5::AtLeastOnce).await.unwrap();
    c.expect_suback().await;
    c
}

fn payloads(got: &[rumqttc::v5::mqttbytes::v5::Publish]) -> Vec<String> {
    got.iter()
        .map(|p| String::from_utf8_lossy(&p.payload).to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_group_splits_messages_and_plain_subscriber_gets_all() {
    let broker = Broker::start("");
    let port = broker.port();
    let mut a = member(port, "sh-a", "$share/g/sh/t").await;
    let mut b = member(port, "sh-b", "$share/g/sh/t").await;
    let mut plain = member(port, "sh-plain", "sh/t").await;
    let (mut publ, _) = V5Client::connect(port, "sh-pub", |_| {}).await;
    for i in 0..N {
        publ.client
            .publish("sh/t", Q5::AtLeastOnce, false, i.to_string())
            .await
            .unwrap();
        publ.expect_publish_done().await;
    }
    // Once the plain subscriber has all N, the broker has routed all N to the group too.
    let mut got_plain = plain.expect_publishes(N, WAIT).await;
    got_plain.extend(plain.publishes_during(QUIET).await);
    let got_plain = payloads(&got_plain);
    let got_a = payloads(&a.publishes_during(QUIET).await);
    let got_b = payloads(&b.publishes_during(QUIET).await);

    let all: Vec<String> = (0..N).map(|i| i.to_string()).collect();
    assert_eq!(
        got_plain, all,
        "a normal subscriber gets every message, in order"
    );
    assert_eq!(
        got_a.len() + got_b.len(),
        N,
        "each message goes to exactly one group member: a={got_a:?} b={got_b:?}"
    );
    let union: BTreeSet<&String> = got_a.iter().chain(got_b.iter()).collect();
    assert_eq!(
        union.len(),
        N,
        "no duplicates and nothing lost: a={got_a:?} b={got_b:?}"
    );
    for (name, got) in [("a", &got_a), ("b", &got_b)] {
        assert!(
            (N / 4..=3 * N / 4).contains(&got.len()),
            "member {name} got {} of {N}: load must be shared (a={got_a:?} b={got_b:?})",
            got.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_each_get_every_message_once() {
    let broker = Broker::start("");
    let port = broker.port();
    let mut g1 = member(port, "sh2-g1", "$share/one/sh2/#").await;
    let mut g2 = member(port, "sh2-g2", "$share/two/sh2/#").await;
    let (mut publ, _) = V5Client::connect(port, "sh2-pub", |_| {}).await;
    for i in 0..5 {
        publ.client
            .publish(format!("sh2/{i}"), Q5::AtLeastOnce, false, i.to_string())
            .await
            .unwrap();
        publ.expect_publish_done().await;
    }
    for g in [&mut g1, &mut g2] {
        let mut got = g.expect_publishes(5, WAIT).await;
        got.extend(g.publishes_during(QUIET).await);
        assert_eq!(payloads(&got), ["0", "1", "2", "3", "4"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remaining_member_gets_everything_after_the_other_unsubscribes() {
    let broker = Broker::start("");
    let port = broker.port();
    let mut a = member(port, "sh3-a", "$share/g/sh3").await;
    let mut b = member(port, "sh3-b", "$share/g/sh3").await;
    b.client.unsubscribe("$share/g/sh3").await.unwrap();
    let acked = b
        .wait_for(WAIT, |p| {
            matches!(p, rumqttc::v5::mqttbytes::v5::Packet::UnsubAck(_)).then_some(())
        })
        .await;
    assert!(acked.is_some(), "no UNSUBACK");
    let (mut publ, _) = V5Client::connect(port, "sh3-pub", |_| {}).await;
    for i in 0..6 {
        publ.client
            .publish("sh3", Q5::AtLeastOnce, false, i.to_string())
            .await
            .unwrap();
        publ.expect_publish_done().await;
    }
    let mut got = a.expect_publishes(6, WAIT).await;
    got.extend(a.publishes_during(QUIET).await);
    assert_eq!(payloads(&got), ["0", "1", "2", "3", "4", "5"]);
    assert!(b.next_publish(QUIET).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_clients_can_share_a_subscription() {
    let broker = Broker::start("");
    let port = broker.port();
    let mut subs = Vec::new();
    for id in ["sh4-a", "sh4-b"] {
        let (mut c, _) = V4Client::connect(port, id, |_| {}).await;
        c.client
            .subscribe("$share/g/sh4", rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
        c.expect_suback().await;
        subs.push(c);
    }
    let (mut publ, _) = V4Client::connect(port, "sh4-pub", |_| {}).await;
    for i in 0..10 {
        publ.client
            .publish("sh4", rumqttc::QoS::AtLeastOnce, false, i.to_string())
            .await
            .unwrap();
        publ.expect_publish_done().await;
    }
    // Poll both members until all 10 arrived (bounded), then check for extras.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut counts = [0usize; 2];
    while counts.iter().sum::<usize>() < 10 && tokio::time::Instant::now() < deadline {
        for (i, s) in subs.iter_mut().enumerate() {
            if s.next_publish(Duration::from_millis(20)).await.is_some() {
                counts[i] += 1;
            }
        }
    }
    for (i, s) in subs.iter_mut().enumerate() {
        counts[i] += s.publishes_during(QUIET).await.len();
    }
    assert_eq!(
        counts.iter().sum::<usize>(),
        10,
        "each message to exactly one member: {counts:?}"
    );
    assert!(
        counts.iter().all(|&c| c > 0),
        "each member gets a share: {counts:?}"
    );
}
