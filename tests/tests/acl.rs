//! Topic access rules (outpost-specific config, `[[broker.acl]]`): with rules configured,
//! a client may publish and receive only what a rule that applies to it allows; `%c` in a
//! rule stands for the client's own id.

use std::time::Duration;

use outpost_mqtt::{Packet, Properties, Protocol, QoS, ReasonCode};
use outpost_tests::raw::{connect_packet, publish, sub_opts};
use outpost_tests::{Broker, RawClient, outpost_only};

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(400);

fn acl_broker() -> Broker {
    Broker::start(
        r#"acl = [
  { topic = "sensors/%c/#", access = "write" },
  { topic = "sensors/#", access = "read" },
  { topic = "logs/#", access = "write" },
]"#,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_limits_publishing_to_own_topics_and_reading_to_granted_ones() {
    outpost_only!();
    let broker = acl_broker();
    let port = broker.port();
    let (mut watcher, _) =
        RawClient::connect(port, connect_packet(Protocol::V5, "watcher", true)).await;
    watcher
        .subscribe(1, "#", sub_opts(QoS::AtLeastOnce), Properties::default())
        .await;
    let (mut dev, _) = RawClient::connect(port, connect_packet(Protocol::V5, "dev1", true)).await;

    // Its own subtree: allowed, and readable by everyone.
    dev.send(&Packet::Publish(publish(
        "sensors/dev1/t",
        QoS::AtLeastOnce,
        Some(1),
        b"ok",
    )))
    .await;
    match dev.expect_packet(WAIT).await {
        Packet::PubAck(a) => assert_eq!(a.reason, ReasonCode::SUCCESS),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    let p = watcher.expect_publish(WAIT).await;
    assert_eq!(&p.topic[..], "sensors/dev1/t");
    watcher.puback(p.packet_id.unwrap()).await;

    // Another device's subtree: refused with 0x87 and not delivered.
    dev.send(&Packet::Publish(publish(
        "sensors/dev2/t",
        QoS::AtLeastOnce,
        Some(2),
        b"spoof",
    )))
    .await;
    match dev.expect_packet(WAIT).await {
        Packet::PubAck(a) => assert_eq!(a.reason, ReasonCode::NOT_AUTHORIZED),
        other => panic!("expected PUBACK 0x87, got {other:?}"),
    }

    // Writable by everyone but readable by no one: accepted, and not delivered.
    dev.send(&Packet::Publish(publish(
        "logs/boot",
        QoS::AtLeastOnce,
        Some(3),
        b"x",
    )))
    .await;
    match dev.expect_packet(WAIT).await {
        Packet::PubAck(a) => assert_eq!(a.reason, ReasonCode::SUCCESS),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    watcher.expect_silence(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_refusal_on_311_is_acknowledged_and_dropped() {
    outpost_only!();
    let broker = acl_broker();
    let port = broker.port();
    let (mut watcher, _) =
        RawClient::connect(port, connect_packet(Protocol::V3_1_1, "watcher", true)).await;
    watcher
        .subscribe(
            1,
            "sensors/#",
            sub_opts(QoS::AtLeastOnce),
            Properties::default(),
        )
        .await;
    let (mut dev, _) =
        RawClient::connect(port, connect_packet(Protocol::V3_1_1, "dev1", true)).await;
    // 3.1.1 has no way to say no: the publisher gets its PUBACK, nobody gets the message,
    // and the connection stays up.
    dev.send(&Packet::Publish(publish(
        "sensors/dev2/t",
        QoS::AtLeastOnce,
        Some(1),
        b"spoof",
    )))
    .await;
    assert!(matches!(dev.expect_packet(WAIT).await, Packet::PubAck(_)));
    watcher.expect_silence(QUIET).await;
    dev.send(&Packet::Publish(publish(
        "sensors/dev1/t",
        QoS::AtLeastOnce,
        Some(2),
        b"ok",
    )))
    .await;
    assert!(matches!(dev.expect_packet(WAIT).await, Packet::PubAck(_)));
    assert_eq!(
        &watcher.expect_publish(WAIT).await.topic[..],
        "sensors/dev1/t"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_nothing_readable_could_match_is_refused_0x87_and_0x80() {
    outpost_only!();
    let broker = acl_broker();
    let port = broker.port();
    // 5.0: Not authorized (0x87) for the filter no read rule overlaps, granted for one
    // that partly overlaps (what it may not read is filtered on delivery).
    let (mut v5, _) = RawClient::connect(port, connect_packet(Protocol::V5, "sub5", true)).await;
    assert_eq!(
        v5.subscribe(
            1,
            "logs/#",
            sub_opts(QoS::AtLeastOnce),
            Properties::default()
        )
        .await,
        ReasonCode::NOT_AUTHORIZED
    );
    assert_eq!(
        v5.subscribe(
            2,
            "+/dev1/#",
            sub_opts(QoS::AtLeastOnce),
            Properties::default()
        )
        .await,
        ReasonCode::GRANTED_QOS_1
    );
    // 3.1.1 has one failure return code, 0x80 (MQTT-3.9.3-2); checked on the wire bytes.
    let mut v4 = RawClient::tcp(port, Protocol::V3_1_1).await;
    v4.send(&Packet::Connect(Box::new(connect_packet(
        Protocol::V3_1_1,
        "sub4",
        true,
    ))))
    .await;
    assert_eq!(v4.read_bytes(4, WAIT).await, vec![0x20, 0x02, 0x00, 0x00]);
    v4.send_bytes(&[
        0x82, 0x0b, 0x00, 0x07, 0x00, 0x06, b'l', b'o', b'g', b's', b'/', b'#', 0x01,
    ])
    .await;
    assert_eq!(
        v4.read_bytes(5, WAIT).await,
        vec![0x90, 0x03, 0x00, 0x07, 0x80],
        "SUBACK with return code 0x80"
    );
}
