//! The broker store: retained messages and persistent sessions survive a restart, a
//! SIGTERM and a `kill -9`, and nothing the broker acknowledged is lost or delivered twice.
//!
//! These are outpost's own guarantees (the suite runs Mosquitto with persistence off), so
//! every test here is outpost-only.

use std::time::Duration;

use outpost_mqtt::{Packet, Properties, Protocol, PubResponse, QoS, ReasonCode};
use outpost_tests::cli::{MosquittoSub, mosquitto_pub};
use outpost_tests::raw::{connect_packet, publish, sub_opts};
use outpost_tests::{Broker, QUIET, RawClient, V4Client, WAIT, assert_broker_serves, outpost_only};
use rumqttc::QoS as Q4;

/// Publishes one message and waits for its PUBACK/PUBCOMP: from here on it is the
/// broker's to keep.
async fn acked(port: u16, id: &str, topic: &str, payload: &str, qos: Q4, retain: bool) {
    let (mut p, _) = V4Client::connect(port, id, |_| {}).await;
    p.client
        .publish(topic, qos, retain, payload.to_string())
        .await
        .unwrap();
    p.expect_publish_done().await;
    p.disconnect().await;
}

/// Lets the store's writer commit changes that no acknowledgement waits for (PUBREC
/// flags, session rows), so a kill after this tests what is on disk, not a race.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_survive_a_restart_and_a_cleared_one_stays_cleared() {
    outpost_only!();
    let mut broker = Broker::start("");
    let port = broker.port();
    acked(
        port,
        "p-ret-a",
        "pst/ret/a",
        "kept-a",
        Q4::AtLeastOnce,
        true,
    )
    .await;
    acked(
        port,
        "p-ret-b",
        "pst/ret/b",
        "kept-b",
        Q4::ExactlyOnce,
        true,
    )
    .await;
    acked(
        port,
        "p-ret-c",
        "pst/ret/c",
        "short-lived",
        Q4::AtLeastOnce,
        true,
    )
    .await;
    // An empty retained payload clears the topic (MQTT-3.3.1-10); the clearing must
    // persist as well as the setting.
    acked(port, "p-ret-c2", "pst/ret/c", "", Q4::AtLeastOnce, true).await;

    assert!(broker.stop_gracefully().is_some(), "outpost did not stop");
    broker.restart();

    let sub = MosquittoSub::start(broker.port(), "pst/ret/#", 1, 3, 3, false).await;
    let mut got: Vec<(String, String, bool)> = sub
        .messages()
        .await
        .into_iter()
        .map(|m| (m.topic, m.payload, m.retain))
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("pst/ret/a".into(), "kept-a".into(), true),
            ("pst/ret/b".into(), "kept-b".into(), true),
        ],
        "retained messages after a restart (RETAIN=1 on subscribe, MQTT-3.3.1-8)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_for_an_offline_session_survive_kill_9_once_each_in_order() {
    outpost_only!();
    let mut broker = Broker::start("");
    let port = broker.port();
    let (mut sub, ack) = V4Client::connect(port, "pst-off-sub", |o| {
        o.set_clean_session(false);
    })
    .await;
    assert!(!ack.session_present);
    sub.client
        .subscribe("pst/off/#", Q4::ExactlyOnce)
        .await
        .unwrap();
    sub.expect_suback().await;
    sub.disconnect().await;

    // Every one of these got its PUBACK or PUBCOMP before the kill.
    let (mut p, _) = V4Client::connect(port, "pst-off-pub", |_| {}).await;
    let mut sent = Vec::new();
    for i in 0..60 {
        let qos = if i % 2 == 0 {
            Q4::AtLeastOnce
        } else {
            Q4::ExactlyOnce
        };
        let payload = format!("m{i:02}");
        p.client
            .publish("pst/off/x", qos, false, payload.clone())
            .await
            .unwrap();
        p.expect_publish_done().await;
        sent.push(payload);
    }
    broker.kill9();
    drop(p);
    broker.restart();
    let port = broker.port();

    let (mut sub, ack) = V4Client::connect(port, "pst-off-sub", |o| {
        o.set_clean_session(false);
    })
    .await;
    assert!(
        ack.session_present,
        "the persistent session must survive the crash (MQTT-3.2.2-2)"
    );
    let got: Vec<String> = sub
        .expect_publishes(sent.len(), WAIT)
        .await
        .into_iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect();
    assert_eq!(got, sent, "every acknowledged message, once, in order");
    assert!(
        sub.next_publish(QUIET).await.is_none(),
        "nothing may be delivered twice"
    );

    // The subscription itself survived: no resubscribe needed.
    acked(
        port,
        "pst-off-pub2",
        "pst/off/y",
        "after",
        Q4::AtLeastOnce,
        false,
    )
    .await;
    let p = sub.expect_publish(WAIT).await;
    assert_eq!(&p.payload[..], b"after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_deliveries_resume_after_kill_9_with_dup_and_pubrel_mqtt_4_4_0_1() {
    outpost_only!();
    let mut broker = Broker::start("");
    let port = broker.port();
    let mut connect = connect_packet(Protocol::V5, "pst-inflight", false);
    connect.properties.session_expiry_interval = Some(3600);
    let (mut raw, _) = RawClient::connect(port, connect.clone()).await;
    let sub_props = Properties {
        subscription_identifiers: vec![42],
        ..Default::default()
    };
    assert_eq!(
        raw.subscribe(1, "pst/infl/#", sub_opts(QoS::ExactlyOnce), sub_props)
            .await,
        ReasonCode::GRANTED_QOS_2
    );

    acked(
        port,
        "pst-infl-p1",
        "pst/infl/one",
        "q1",
        Q4::AtLeastOnce,
        false,
    )
    .await;
    let first = raw.expect_publish(WAIT).await;
    assert_eq!(first.qos, QoS::AtLeastOnce);
    let id1 = first.packet_id.expect("QoS 1 has a packet id");
    // No PUBACK for this one.

    acked(
        port,
        "pst-infl-p2",
        "pst/infl/two",
        "q2",
        Q4::ExactlyOnce,
        false,
    )
    .await;
    let second = raw.expect_publish(WAIT).await;
    assert_eq!(second.qos, QoS::ExactlyOnce);
    let id2 = second.packet_id.expect("QoS 2 has a packet id");
    raw.send(&Packet::PubRec(PubResponse::new(id2))).await;
    match raw.expect_packet(WAIT).await {
        Packet::PubRel(r) => assert_eq!(r.packet_id, id2),
        other => panic!("expected PUBREL, got {other:?}"),
    }
    // No PUBCOMP: the exchange is at its second half.
    settle().await;
    raw.drop_abruptly();
    broker.kill9();
    broker.restart();
    let port = broker.port();

    let (mut raw, ack) = RawClient::connect(port, connect).await;
    assert!(ack.session_present, "session present after the crash");
    let again = raw.expect_publish(WAIT).await;
    assert!(again.dup, "a resent PUBLISH has DUP=1 (MQTT-3.3.1-1)");
    assert_eq!(again.packet_id, Some(id1), "same packet id (MQTT-4.4.0-1)");
    assert_eq!(&again.payload[..], b"q1");
    assert_eq!(again.properties.subscription_identifiers, vec![42]);
    match raw.expect_packet(WAIT).await {
        Packet::PubRel(r) => assert_eq!(
            r.packet_id, id2,
            "after PUBREC the broker resends PUBREL, never the PUBLISH (MQTT-4.3.3-5)"
        ),
        other => panic!("expected PUBREL for the QoS 2 message, got {other:?}"),
    }
    raw.puback(id1).await;
    raw.send(&Packet::PubComp(PubResponse::new(id2))).await;
    raw.expect_silence(QUIET).await;

    // The subscription and its identifier came back too.
    acked(
        port,
        "pst-infl-p3",
        "pst/infl/three",
        "new",
        Q4::AtLeastOnce,
        false,
    )
    .await;
    let p = raw.expect_publish(WAIT).await;
    assert_eq!(&p.payload[..], b"new");
    assert_eq!(p.properties.subscription_identifiers, vec![42]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos2_publish_resent_after_kill_9_is_delivered_once_mqtt_4_3_3_9() {
    outpost_only!();
    let mut broker = Broker::start("");
    let port = broker.port();
    let (mut sub, _) = V4Client::connect(port, "pst-q2-sub", |o| {
        o.set_clean_session(false);
    })
    .await;
    sub.client
        .subscribe("pst/q2/#", Q4::ExactlyOnce)
        .await
        .unwrap();
    sub.expect_suback().await;
    sub.disconnect().await;

    let pub_connect = connect_packet(Protocol::V3_1_1, "pst-q2-pub", false);
    let (mut publ, _) = RawClient::connect(port, pub_connect.clone()).await;
    publ.send(&Packet::Publish(publish(
        "pst/q2/x",
        QoS::ExactlyOnce,
        Some(7),
        b"only-once",
    )))
    .await;
    match publ.expect_packet(WAIT).await {
        Packet::PubRec(r) => assert_eq!(r.packet_id, 7),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    // The broker crashes before the PUBREL; the publisher cannot know whether its
    // message counted, so it sends the PUBLISH again with DUP.
    publ.drop_abruptly();
    broker.kill9();
    broker.restart();
    let port = broker.port();

    let (mut publ, ack) = RawClient::connect(port, pub_connect).await;
    assert!(ack.session_present, "the publisher's session survived");
    let mut resend = publish("pst/q2/x", QoS::ExactlyOnce, Some(7), b"only-once");
    resend.dup = true;
    publ.send(&Packet::Publish(resend)).await;
    match publ.expect_packet(WAIT).await {
        Packet::PubRec(r) => assert_eq!(r.packet_id, 7),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    publ.send(&Packet::PubRel(PubResponse::new(7))).await;
    match publ.expect_packet(WAIT).await {
        Packet::PubComp(r) => assert_eq!(r.packet_id, 7),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }

    let (mut sub, _) = V4Client::connect(port, "pst-q2-sub", |o| {
        o.set_clean_session(false);
    })
    .await;
    let p = sub.expect_publish(WAIT).await;
    assert_eq!(&p.payload[..], b"only-once");
    assert!(
        sub.next_publish(QUIET).await.is_none(),
        "a QoS 2 message resent before PUBREL is the same message (MQTT-4.3.3-9)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_expiry_runs_again_from_the_restart() {
    outpost_only!();
    let mut broker = Broker::start("");
    let port = broker.port();
    let mut short = connect_packet(Protocol::V5, "pst-exp-short", false);
    short.properties.session_expiry_interval = Some(1);
    let mut long = connect_packet(Protocol::V5, "pst-exp-long", false);
    long.properties.session_expiry_interval = Some(3600);
    for c in [&short, &long] {
        let (mut raw, _) = RawClient::connect(port, c.clone()).await;
        raw.subscribe(
            1,
            "pst/exp/#",
            sub_opts(QoS::AtLeastOnce),
            Properties::default(),
        )
        .await;
        raw.disconnect().await;
    }
    settle().await;
    broker.kill9();
    broker.restart();
    let port = broker.port();
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let (_, ack) = RawClient::connect(port, short).await;
    assert!(
        !ack.session_present,
        "a session past its expiry interval is gone (MQTT-3.1.2-23)"
    );
    let (_, ack) = RawClient::connect(port, long).await;
    assert!(ack.session_present, "a session within its expiry is kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_sessions_and_persistence_off_keep_nothing() {
    outpost_only!();
    let mut broker = Broker::start("persistence = false");
    let port = broker.port();
    acked(
        port,
        "pst-off-ret",
        "pst/none/r",
        "gone",
        Q4::AtLeastOnce,
        true,
    )
    .await;
    let (mut sub, _) = V4Client::connect(port, "pst-none-sub", |o| {
        o.set_clean_session(false);
    })
    .await;
    sub.client
        .subscribe("pst/none/#", Q4::AtLeastOnce)
        .await
        .unwrap();
    sub.expect_suback().await;
    sub.disconnect().await;
    broker.restart();
    let (mut sub, ack) = V4Client::connect(broker.port(), "pst-none-sub", |o| {
        o.set_clean_session(false);
    })
    .await;
    assert!(
        !ack.session_present,
        "with persistence = false a restart starts empty"
    );
    sub.client
        .subscribe("pst/none/#", Q4::AtLeastOnce)
        .await
        .unwrap();
    assert!(
        sub.next_publish(QUIET).await.is_none(),
        "no retained message after a restart without persistence"
    );
    assert!(
        !broker.state_dir().join("broker.sqlite").exists(),
        "persistence = false writes no store"
    );

    // With persistence on, a clean session still ends with its connection.
    let mut broker = Broker::start("");
    let (mut c, _) = V4Client::connect(broker.port(), "pst-clean", |o| {
        o.set_clean_session(true);
    })
    .await;
    c.client
        .subscribe("pst/clean/#", Q4::AtLeastOnce)
        .await
        .unwrap();
    c.expect_suback().await;
    c.disconnect().await;
    settle().await;
    broker.kill9();
    assert!(
        !broker.state_dir().join("broker.sqlite").exists(),
        "a broker that has kept nothing has no store file"
    );
    broker.restart();
    let (_, ack) = V4Client::connect(broker.port(), "pst-clean", |o| {
        o.set_clean_session(false);
    })
    .await;
    assert!(!ack.session_present, "a clean session is never stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_is_set_aside_and_the_broker_still_starts() {
    outpost_only!();
    let mut broker = Broker::start("");
    acked(
        broker.port(),
        "pst-dmg",
        "pst/dmg",
        "x",
        Q4::AtLeastOnce,
        true,
    )
    .await;
    assert!(broker.stop_gracefully().is_some());
    let store = broker.state_dir().join("broker.sqlite");
    assert!(store.exists(), "the store lives in the state directory");
    std::fs::write(&store, vec![0x5a; 8192]).unwrap();
    for side in ["broker.sqlite-wal", "broker.sqlite-shm"] {
        let _ = std::fs::remove_file(broker.state_dir().join(side));
    }
    broker.restart();
    assert_broker_serves(broker.port(), "pst-dmg").await;
    let aside: Vec<String> = std::fs::read_dir(broker.state_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("broker.sqlite.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "the damaged file is kept aside: {aside:?}");
    assert!(
        broker.log().contains("broker store is damaged"),
        "the log says what happened"
    );
    // The broker keeps working with a fresh store.
    mosquitto_pub(broker.port(), "pst/dmg/new", "fresh", 1, true, false).await;
    broker.restart();
    let sub = MosquittoSub::start(broker.port(), "pst/dmg/#", 1, 1, 3, false).await;
    let got = sub.messages().await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, "fresh");
}

fn page_size(store: &std::path::Path) -> i64 {
    rusqlite::Connection::open(store)
        .unwrap()
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .unwrap()
}

/// An appliance upgraded in place keeps its state directory: a store an earlier release made
/// with 4 KiB pages is rewritten with small ones at the first start (fewer bytes written per
/// commit), and keeps what it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_from_an_earlier_release_is_rewritten_with_small_pages_and_keeps_its_messages() {
    outpost_only!();
    let mut broker = Broker::start("");
    acked(
        broker.port(),
        "pst-pg",
        "pst/pg/retained",
        "kept",
        Q4::AtLeastOnce,
        true,
    )
    .await;
    assert!(broker.stop_gracefully().is_some());
    let store = broker.state_dir().join("broker.sqlite");
    assert_eq!(page_size(&store), 1024, "a new store has 1 KiB pages");
    // What an earlier release left: the same rows, in 4 KiB pages.
    rusqlite::Connection::open(&store)
        .unwrap()
        .execute_batch(
            "PRAGMA journal_mode = DELETE; PRAGMA page_size = 4096; VACUUM; \
             PRAGMA journal_mode = WAL;",
        )
        .unwrap();
    assert_eq!(page_size(&store), 4096);

    broker.restart();
    let sub = MosquittoSub::start(broker.port(), "pst/pg/#", 1, 1, 3, false).await;
    let got = sub.messages().await;
    assert_eq!(got.len(), 1, "the retained message is still there");
    assert_eq!(got[0].payload, "kept");
    assert!(
        broker
            .log()
            .contains("rewritten with 1024-byte pages (it had 4096-byte pages)"),
        "the log says what happened: {}",
        broker.log()
    );
    assert!(broker.stop_gracefully().is_some());
    assert_eq!(page_size(&store), 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_subscriber_that_never_acknowledges_gets_its_message_after_kill_9() {
    outpost_only!();
    let mut broker = Broker::start("");
    let port = broker.port();
    let connect = connect_packet(Protocol::V3_1_1, "pst-noack", false);
    let (mut raw, _) = RawClient::connect(port, connect.clone()).await;
    raw.subscribe(
        1,
        "pst/noack",
        sub_opts(QoS::AtLeastOnce),
        Properties::default(),
    )
    .await;
    // The PUBACK to the publisher comes only once the delivery is acknowledged or on
    // disk; this subscriber never acknowledges, so it must be on disk.
    acked(
        port,
        "pst-noack-pub",
        "pst/noack",
        "owed",
        Q4::AtLeastOnce,
        false,
    )
    .await;
    let first = raw.expect_publish(WAIT).await;
    broker.kill9();
    drop(raw);
    broker.restart();

    let (mut raw, ack) = RawClient::connect(broker.port(), connect).await;
    assert!(ack.session_present);
    let again = raw.expect_publish(WAIT).await;
    assert_eq!(&again.payload[..], b"owed");
    assert!(again.dup, "resent with DUP=1 (MQTT-3.3.1-1)");
    assert_eq!(
        again.packet_id, first.packet_id,
        "same packet id (MQTT-4.4.0-1)"
    );
}

/// The value of a retained `$SYS` topic once it satisfies `ok`.
async fn sys_value(port: u16, topic: &str, ok: impl Fn(u64) -> bool) -> u64 {
    let (mut c, _) = V4Client::connect(port, &format!("pst-sys-{}", rand_suffix()), |_| {}).await;
    c.client.subscribe(topic, Q4::AtMostOnce).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut last = None;
    while tokio::time::Instant::now() < deadline {
        if let Some(p) = c.next_publish(Duration::from_secs(2)).await {
            let v: u64 = String::from_utf8_lossy(&p.payload).parse().unwrap();
            if ok(v) {
                return v;
            }
            last = Some(v);
        }
    }
    panic!("{topic} never reached the expected value (last {last:?})");
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_a_connected_subscriber_acknowledges_are_not_written() {
    outpost_only!();
    let broker = Broker::start("sys_interval = \"1s\"");
    let port = broker.port();
    const WRITTEN: &str = "$SYS/broker/store/messages_written";
    let (mut sub, _) = V4Client::connect(port, "pst-w-sub", |o| {
        o.set_clean_session(false);
    })
    .await;
    sub.client
        .subscribe("pst/w/#", Q4::ExactlyOnce)
        .await
        .unwrap();
    sub.expect_suback().await;
    sub.disconnect().await;

    // Offline: every message it is owed goes to disk at once.
    for i in 0..3 {
        acked(
            port,
            "pst-w-p0",
            "pst/w/q",
            &format!("q{i}"),
            Q4::AtLeastOnce,
            false,
        )
        .await;
    }
    let queued = sys_value(port, WRITTEN, |v| v >= 3).await;
    assert_eq!(queued, 3, "the three queued messages are written");

    let (mut sub, _) = V4Client::connect(port, "pst-w-sub", |o| {
        o.set_clean_session(false);
    })
    .await;
    assert_eq!(sub.expect_publishes(3, WAIT).await.len(), 3);
    // Online and acknowledging (rumqttc answers each PUBLISH at once): the broker need
    // not write a QoS 1 message that comes back acknowledged within its grace period.
    let (mut p, _) = V4Client::connect(port, "pst-w-p1", |_| {}).await;
    for i in 0..100 {
        p.client
            .publish("pst/w/live", Q4::AtLeastOnce, false, format!("l{i}"))
            .await
            .unwrap();
        p.expect_publish_done().await;
    }
    assert_eq!(sub.expect_publishes(100, WAIT).await.len(), 100);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let after_qos1 = sys_value(port, WRITTEN, |_| true).await;
    // A slow scheduler may let an acknowledgement miss the 50 ms grace now and then;
    // writing every message would make this 100.
    assert!(
        after_qos1 - queued <= 10,
        "{} of 100 promptly acknowledged QoS 1 messages were written",
        after_qos1 - queued
    );
    // QoS 2 is written once each, whatever the subscriber does: after a crash the broker
    // must know both the publisher's packet id and the delivery, or exactly once breaks
    // (tests/tests/crash_kills.rs).
    for i in 0..20 {
        p.client
            .publish("pst/w/live", Q4::ExactlyOnce, false, format!("e{i}"))
            .await
            .unwrap();
        p.expect_publish_done().await;
    }
    assert_eq!(sub.expect_publishes(20, WAIT).await.len(), 20);
    let total = sys_value(port, WRITTEN, |v| v >= after_qos1 + 20).await;
    assert_eq!(
        total - after_qos1,
        20,
        "each QoS 2 delivery is written once"
    );
}
