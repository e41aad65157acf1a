//! The bounds a LAN broker needs (issue #17): each is a `[broker]` key with a safe default,
//! refuses with the right reason code at its edge and not before, and is counted in
//! `$SYS/broker/limits/...`. Also the regression for the subscription tree's recursion: a
//! client-chosen depth must never crash the broker.
//!
//! Outpost's own keys: outpost only.

use std::time::Duration;

use outpost_mqtt::{
    Connect, Packet, Properties, Protocol, PubResponse, QoS, ReasonCode, Subscribe,
    SubscribeFilter, Unsubscribe, Will,
};
use outpost_tests::raw::{connect_packet, publish, sub_opts};
use outpost_tests::{Broker, QUIET, RawClient, WAIT, assert_broker_serves, outpost_only};

async fn connect(port: u16, protocol: Protocol, id: &str) -> RawClient {
    let (c, ack) = RawClient::connect(port, connect_packet(protocol, id, true)).await;
    assert_eq!(ack.reason, ReasonCode::SUCCESS, "{id} connects");
    c
}

async fn puback(c: &mut RawClient) -> PubResponse {
    match c.expect_packet(WAIT).await {
        Packet::PubAck(r) => r,
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

/// Waits (up to 5 s) for a line of the broker's log that `want` accepts.
async fn log_shows(broker: &Broker, want: impl Fn(&str) -> bool) -> bool {
    for _ in 0..50 {
        if broker.log().lines().any(&want) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A topic of `levels` levels.
fn topic_of(levels: usize) -> String {
    vec!["l"; levels].join("/")
}

/// Reads one retained `$SYS/broker/{name}` value.
async fn sys_value(port: u16, name: &str) -> u64 {
    let mut c = connect(
        port,
        Protocol::V3_1_1,
        &format!("sys-{}", name.replace('/', "-")),
    )
    .await;
    c.subscribe(
        1,
        &format!("$SYS/broker/{name}"),
        sub_opts(QoS::AtMostOnce),
        Properties::default(),
    )
    .await;
    let p = c.expect_publish(WAIT).await;
    std::str::from_utf8(&p.payload)
        .expect("utf-8")
        .parse()
        .expect("a number")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_levels_are_bounded_at_200_by_default() {
    outpost_only!();
    let broker = Broker::start("sys_interval = \"1s\"");
    let port = broker.port();
    let mut v5 = connect(port, Protocol::V5, "lv-5").await;
    // 5.0 section 3.9.3: 0x8F Topic Filter invalid, "correctly formed but not allowed".
    assert_eq!(
        v5.subscribe(
            1,
            &topic_of(200),
            sub_opts(QoS::AtLeastOnce),
            Properties::default()
        )
        .await,
        ReasonCode::GRANTED_QOS_1,
        "200 levels are allowed"
    );
    assert_eq!(
        v5.subscribe(
            2,
            &topic_of(201),
            sub_opts(QoS::AtLeastOnce),
            Properties::default()
        )
        .await,
        ReasonCode::TOPIC_FILTER_INVALID
    );
    v5.send(&Packet::Publish(publish(
        &topic_of(200),
        QoS::AtLeastOnce,
        Some(3),
        b"ok",
    )))
    .await;
    // Its own PUBACK and the message, in either order.
    let (mut acked, mut delivered) = (false, false);
    for _ in 0..2 {
        match v5.expect_packet(WAIT).await {
            Packet::PubAck(r) => acked = !r.reason.is_error(),
            Packet::Publish(p) => {
                delivered = p.payload.as_ref() == b"ok";
                v5.send(&Packet::PubAck(PubResponse::new(p.packet_id.unwrap())))
                    .await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(acked && delivered, "200 levels are published and delivered");
    // 0x90 Topic Name invalid: "not malformed, but not accepted by this Server".
    v5.send(&Packet::Publish(publish(
        &topic_of(201),
        QoS::AtLeastOnce,
        Some(4),
        b"no",
    )))
    .await;
    assert_eq!(puback(&mut v5).await.reason, ReasonCode::TOPIC_NAME_INVALID);

    let mut v4 = connect(port, Protocol::V3_1_1, "lv-4").await;
    // MQTT-3.9.3-2: 0x80 is 3.1.1's one failure code.
    assert_eq!(
        v4.subscribe(
            1,
            &topic_of(201),
            sub_opts(QoS::AtLeastOnce),
            Properties::default()
        )
        .await,
        ReasonCode::UNSPECIFIED_ERROR
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(sys_value(port, "limits/topic_levels").await, 3);
    assert_broker_serves(port, "after deep topics").await;
}

/// Issue #17, breach 1: removing a filter of 21,000 levels overflowed the stack. Here the
/// deepest filter the protocol can carry (65,535 bytes: 32,768 levels of `a`, and 65,536
/// empty levels) is subscribed with the level bound off, then removed every way a
/// subscription goes: UNSUBSCRIBE, the end of a clean session, and a persistent session
/// across a restart and its takeover by a clean one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deepest_filters_a_client_can_send_never_crash_the_broker() {
    outpost_only!();
    let mut broker = Broker::start("max_topic_levels = 0\nmax_packet_size = \"1MiB\"");
    let port = broker.port();
    let a_levels = format!("{}a", "a/".repeat(32_767));
    let empty_levels = "/".repeat(65_535);
    assert_eq!(a_levels.len(), 65_535);

    let mut c = connect(port, Protocol::V3_1_1, "deep-unsub").await;
    for (i, f) in [&a_levels, &empty_levels].into_iter().enumerate() {
        let id = u16::try_from(i).unwrap() + 1;
        assert_eq!(
            c.subscribe(id, f, sub_opts(QoS::AtMostOnce), Properties::default())
                .await,
            ReasonCode::GRANTED_QOS_0
        );
        // A message down the whole depth is matched without recursion too.
        c.send(&Packet::Publish(publish(f, QoS::AtMostOnce, None, b"deep")))
            .await;
        assert_eq!(c.expect_publish(WAIT).await.payload.as_ref(), b"deep");
        c.send(&Packet::Unsubscribe(Unsubscribe {
            packet_id: id + 10,
            filters: vec![f.clone()],
            properties: Properties::default(),
        }))
        .await;
        assert!(matches!(c.expect_packet(WAIT).await, Packet::UnsubAck(_)));
    }

    let mut clean = connect(port, Protocol::V5, "deep-clean").await;
    clean
        .subscribe(
            1,
            &a_levels,
            sub_opts(QoS::AtMostOnce),
            Properties::default(),
        )
        .await;
    drop(clean);

    let persistent = connect_packet(Protocol::V3_1_1, "deep-kept", false);
    let (mut kept, _) = RawClient::connect(port, persistent.clone()).await;
    kept.subscribe(
        1,
        &a_levels,
        sub_opts(QoS::AtLeastOnce),
        Properties::default(),
    )
    .await;
    drop(kept);
    assert_broker_serves(port, "after deep filters went").await;
    broker.restart();
    let port = broker.port();
    let (_kept, ack) = RawClient::connect(port, persistent).await;
    assert!(
        ack.session_present,
        "the deep subscription came back from the store"
    );
    // A clean session with the same id ends the persistent one and its filter.
    let _taken = connect(port, Protocol::V3_1_1, "deep-kept").await;
    assert_broker_serves(port, "after the restart and takeover").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_bounded_per_address_and_in_all() {
    outpost_only!();
    let broker = Broker::start("max_connections_per_address = 3\nsys_interval = \"1s\"");
    let port = broker.port();
    let mut open = Vec::new();
    for i in 0..3 {
        open.push(connect(port, Protocol::V3_1_1, &format!("pa-{i}")).await);
    }
    let mut fourth = RawClient::tcp(port, Protocol::V3_1_1).await;
    fourth
        .send(&Packet::Connect(Box::new(connect_packet(
            Protocol::V3_1_1,
            "pa-3",
            true,
        ))))
        .await;
    assert!(
        fourth.closed_within(WAIT).await,
        "the 4th connection from 127.0.0.1 is closed"
    );
    drop(open.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    open.push(connect(port, Protocol::V3_1_1, "pa-4").await);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    drop(open.pop());
    // Its place comes back once the broker has seen it go.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sys_value(port, "limits/connections_per_address").await, 1);

    let broker = Broker::start("max_connections = 2\nmax_connections_per_address = 0");
    let port = broker.port();
    let _a = connect(port, Protocol::V5, "t-0").await;
    let _b = connect(port, Protocol::V5, "t-1").await;
    let mut third = RawClient::tcp(port, Protocol::V5).await;
    assert!(
        third.closed_within(WAIT).await,
        "the 3rd connection is closed at accept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_bounded_and_an_existing_one_may_still_resume() {
    outpost_only!();
    let broker = Broker::start("max_sessions = 2");
    let port = broker.port();
    let kept = connect_packet(Protocol::V3_1_1, "s-kept", false);
    drop(RawClient::connect(port, kept.clone()).await);
    let _live = connect(port, Protocol::V5, "s-live").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_c, ack) = RawClient::connect(port, connect_packet(Protocol::V5, "s-new", true)).await;
    assert_eq!(ack.reason, ReasonCode::QUOTA_EXCEEDED, "5.0: 0x97");
    let (_c, ack) =
        RawClient::connect(port, connect_packet(Protocol::V3_1_1, "s-new4", true)).await;
    assert_eq!(
        ack.reason,
        ReasonCode::SERVER_UNAVAILABLE,
        "3.1.1: return code 3"
    );
    let (_c, ack) = RawClient::connect(port, kept).await;
    assert_eq!(ack.reason, ReasonCode::SUCCESS);
    assert!(ack.session_present, "its own session is not a new one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_is_bounded_before_authentication() {
    outpost_only!();
    let broker = Broker::start("max_connect_size = \"1KiB\"\nsys_interval = \"1s\"");
    let port = broker.port();
    let with_will = |id: &str, size: usize| -> Connect {
        let mut c = connect_packet(Protocol::V3_1_1, id, true);
        c.will = Some(Will {
            topic: "w".into(),
            payload: vec![b'x'; size].into(),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Properties::default(),
        });
        c
    };
    let (_ok, ack) = RawClient::connect(port, with_will("small", 900)).await;
    assert_eq!(ack.reason, ReasonCode::SUCCESS, "a 0.9 KiB CONNECT fits");
    let mut big = RawClient::tcp(port, Protocol::V3_1_1).await;
    big.send(&Packet::Connect(Box::new(with_will("big", 2048))))
        .await;
    assert!(big.closed_within(WAIT).await, "a 2 KiB CONNECT is closed");
    assert!(
        log_shows(&broker, |l| l.contains("max_connect_size")).await,
        "and logged with the key"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(sys_value(port, "limits/connect_size").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_started_packet_must_finish_within_packet_timeout_even_without_keep_alive() {
    outpost_only!();
    let broker = Broker::start("packet_timeout = \"1s\"\nsys_interval = \"1s\"");
    let port = broker.port();
    let mut idle = connect_packet(Protocol::V3_1_1, "pt-idle", true);
    idle.keep_alive = 0;
    let (mut idle, _) = RawClient::connect(port, idle).await;
    let mut slow = connect_packet(Protocol::V3_1_1, "pt-slow", true);
    slow.keep_alive = 0;
    let (mut slow, _) = RawClient::connect(port, slow).await;
    // A PUBLISH header announcing 100 bytes, then nothing more.
    slow.send_bytes(&[0x30, 100, 0, 1, b't']).await;
    assert!(
        slow.closed_within(Duration::from_secs(4)).await,
        "an unfinished packet is closed after packet_timeout"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(sys_value(port, "limits/packet_timeout").await, 1);
    // Idle between packets is keep alive's business (0: none), not packet_timeout's.
    idle.expect_silence(Duration::from_millis(500)).await;
    idle.send(&Packet::PingReq).await;
    assert!(matches!(
        idle.expect_packet_raw(WAIT).await,
        Packet::PingResp
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_per_client_are_bounded() {
    outpost_only!();
    let broker = Broker::start("max_subscriptions_per_client = 2");
    let port = broker.port();
    for protocol in [Protocol::V5, Protocol::V3_1_1] {
        let mut c = connect(port, protocol, &format!("sub-{}", protocol as u8)).await;
        let o = sub_opts(QoS::AtMostOnce);
        assert_eq!(
            c.subscribe(1, "a", o, Properties::default()).await,
            ReasonCode::GRANTED_QOS_0
        );
        assert_eq!(
            c.subscribe(2, "b", o, Properties::default()).await,
            ReasonCode::GRANTED_QOS_0
        );
        let refused = if protocol == Protocol::V5 {
            ReasonCode::QUOTA_EXCEEDED
        } else {
            ReasonCode::UNSPECIFIED_ERROR
        };
        assert_eq!(c.subscribe(3, "c", o, Properties::default()).await, refused);
        // Replacing one it holds is not a new one.
        assert_eq!(
            c.subscribe(4, "a", o, Properties::default()).await,
            ReasonCode::GRANTED_QOS_0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_bounded_in_count_and_bytes() {
    outpost_only!();
    let broker = Broker::start(
        "max_retained_messages = 2\nmax_retained_bytes = \"1KiB\"\nsys_interval = \"1s\"",
    );
    let port = broker.port();
    let mut v5 = connect(port, Protocol::V5, "r-5").await;
    let retained = |topic: &str, id: u16, payload: &[u8]| {
        let mut p = publish(topic, QoS::AtLeastOnce, Some(id), payload);
        p.retain = true;
        Packet::Publish(p)
    };
    v5.send(&retained("r/a", 1, b"a")).await;
    assert!(!puback(&mut v5).await.reason.is_error());
    v5.send(&retained("r/b", 2, b"b")).await;
    assert!(!puback(&mut v5).await.reason.is_error());
    v5.send(&retained("r/c", 3, b"c")).await;
    assert_eq!(
        puback(&mut v5).await.reason,
        ReasonCode::QUOTA_EXCEEDED,
        "a third topic"
    );
    // Replacing a kept topic is fine, within the byte bound; past it, refused.
    v5.send(&retained("r/a", 4, &[b'x'; 1000])).await;
    assert!(
        !puback(&mut v5).await.reason.is_error(),
        "1000 + 1 bytes fit in 1 KiB"
    );
    v5.send(&retained("r/b", 5, &[b'y'; 100])).await;
    assert_eq!(
        puback(&mut v5).await.reason,
        ReasonCode::QUOTA_EXCEEDED,
        "1100 bytes do not"
    );

    // 3.1.1 cannot be told: the message is delivered but not retained.
    let mut watcher = connect(port, Protocol::V3_1_1, "r-watch").await;
    watcher
        .subscribe(1, "r/#", sub_opts(QoS::AtMostOnce), Properties::default())
        .await;
    let mut got: Vec<String> = Vec::new();
    for _ in 0..2 {
        let p = watcher.expect_publish(WAIT).await;
        got.push(p.topic.to_string());
    }
    got.sort();
    assert_eq!(got, ["r/a", "r/b"], "the two kept retained messages");
    let mut v4 = connect(port, Protocol::V3_1_1, "r-4").await;
    v4.send(&retained("r/d", 1, b"d")).await;
    assert!(!puback(&mut v4).await.reason.is_error());
    let live = watcher.expect_publish(WAIT).await;
    assert_eq!(&*live.topic, "r/d", "delivered to current subscribers");
    let mut late = connect(port, Protocol::V3_1_1, "r-late").await;
    late.subscribe(1, "r/d", sub_opts(QoS::AtMostOnce), Properties::default())
        .await;
    late.expect_silence(QUIET).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(sys_value(port, "limits/retained").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_queue_is_bounded_in_bytes_as_well_as_messages() {
    outpost_only!();
    let broker = Broker::start("max_queued_bytes = \"8KiB\"\nsys_interval = \"1s\"");
    let port = broker.port();
    let sub = connect_packet(Protocol::V3_1_1, "q-sub", false);
    let (mut s, _) = RawClient::connect(port, sub.clone()).await;
    s.subscribe(1, "q/#", sub_opts(QoS::AtLeastOnce), Properties::default())
        .await;
    drop(s);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut p = connect(port, Protocol::V3_1_1, "q-pub").await;
    for i in 1..=20u16 {
        p.send(&Packet::Publish(publish(
            "q/x",
            QoS::AtLeastOnce,
            Some(i),
            &[b'z'; 1000],
        )))
        .await;
        puback(&mut p).await;
    }
    let (mut s, ack) = RawClient::connect(port, sub).await;
    assert!(ack.session_present);
    let mut n = 0;
    while let Ok(Packet::Publish(m)) = s.recv(QUIET).await {
        n += 1;
        s.send(&Packet::PubAck(PubResponse::new(m.packet_id.unwrap())))
            .await;
    }
    // 1000-byte payloads plus their topic and overhead: at most 8 fit in 8 KiB.
    assert!((4..=8).contains(&n), "{n} of 20 queued within 8 KiB");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(sys_value(port, "limits/queued_bytes").await, 20 - n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_packet_size_carries_a_1_mib_payload() {
    outpost_only!();
    let broker = Broker::start("");
    let port = broker.port();
    let mut s = connect(port, Protocol::V5, "big-sub").await;
    s.subscribe(
        1,
        "fw/chunk",
        sub_opts(QoS::AtLeastOnce),
        Properties::default(),
    )
    .await;
    let mut p = connect(port, Protocol::V3_1_1, "big-pub").await;
    let chunk = vec![7u8; 1 << 20];
    p.send(&Packet::Publish(publish(
        "fw/chunk",
        QoS::AtLeastOnce,
        Some(1),
        &chunk,
    )))
    .await;
    puback(&mut p).await;
    assert_eq!(s.expect_publish(WAIT).await.payload.len(), 1 << 20);
    // Past max_packet_size the connection closes, and the log names client and size.
    let mut too_big = connect(port, Protocol::V3_1_1, "too-big").await;
    too_big
        .send(&Packet::Publish(publish(
            "fw/chunk",
            QoS::AtLeastOnce,
            Some(1),
            &vec![0u8; 3 << 20],
        )))
        .await;
    assert!(too_big.closed_within(WAIT).await);
    // The refusal names the key and the size; the disconnect line beside it names the
    // client and the reason, by the same conn_id.
    assert!(
        log_shows(&broker, |l| l.contains("max_packet_size")
            && l.contains("size=3145"))
        .await,
        "the refusal is logged with the size:\n{}",
        broker.log()
    );
    assert!(
        log_shows(&broker, |l| l.contains("client_id=too-big")
            && l.contains("packet too large"))
        .await,
        "the disconnect names the client and the reason:\n{}",
        broker.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_with_several_filters_counts_each_against_the_bounds() {
    outpost_only!();
    let broker = Broker::start("max_subscriptions_per_client = 1\nmax_topic_levels = 2");
    let mut c = connect(broker.port(), Protocol::V5, "multi").await;
    c.send(&Packet::Subscribe(Subscribe {
        packet_id: 9,
        filters: ["a/b", "a/b/c", "x"]
            .into_iter()
            .map(|f| SubscribeFilter {
                filter: f.into(),
                options: sub_opts(QoS::AtMostOnce),
            })
            .collect(),
        properties: Properties::default(),
    }))
    .await;
    match c.expect_packet(WAIT).await {
        Packet::SubAck(a) => assert_eq!(
            a.reason_codes,
            [
                ReasonCode::GRANTED_QOS_0,
                ReasonCode::TOPIC_FILTER_INVALID,
                ReasonCode::QUOTA_EXCEEDED
            ]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

/// A new subscriber whose filter matches more retained messages than its backlog holds
/// (QoS 0: 8 MiB waiting on its socket) gets what fits; the rest is counted in
/// `$SYS/broker/messages/dropped/slow_client` and logged, never silently cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_beyond_a_new_subscribers_backlog_are_counted_and_logged() {
    outpost_only!();
    let broker = Broker::start(
        "max_retained_messages = 0\nmax_retained_bytes = \"1GiB\"\npersistence = false\nsys_interval = \"1s\"",
    );
    let port = broker.port();
    let mut p = connect(port, Protocol::V3_1_1, "rb-pub").await;
    const N: usize = 3000;
    let body = vec![b'r'; 4096];
    for i in 0..N {
        let mut m = publish(&format!("rb/{i}"), QoS::AtMostOnce, None, &body);
        m.retain = true;
        p.send(&Packet::Publish(m)).await;
    }
    // A round trip: everything before it has been taken in.
    p.send(&Packet::PingReq).await;
    assert!(matches!(p.expect_packet_raw(WAIT).await, Packet::PingResp));

    let mut s = connect(port, Protocol::V3_1_1, "rb-sub").await;
    s.subscribe(1, "rb/#", sub_opts(QoS::AtMostOnce), Properties::default())
        .await;
    let mut got = 0u64;
    while let Ok(Packet::Publish(_)) = s.recv(Duration::from_millis(500)).await {
        got += 1;
    }
    let n = N as u64;
    assert!(
        got < n,
        "12 MB of retained messages do not fit an 8 MiB backlog"
    );
    assert!(got > n / 2, "what fits is sent: {got}");
    assert!(
        log_shows(&broker, |l| l.contains("rb-sub") && l.contains("not_sent")).await,
        "the cut is logged with the client"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        sys_value(port, "messages/dropped/slow_client").await,
        n - got
    );
}

/// `max_store_size` bounds what persistent sessions can make the broker keep on disk:
/// past it a 5.0 publisher is refused (0x97), everything acknowledged reaches the
/// offline subscriber, and once it drains the store takes messages again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_quota_refuses_past_its_size_and_takes_messages_again_once_drained() {
    outpost_only!();
    let broker = Broker::start("max_store_size = \"1MiB\"\nsys_interval = \"1s\"");
    let port = broker.port();
    let sub = connect_packet(Protocol::V3_1_1, "quota-sub", false);
    let (mut s, _) = RawClient::connect(port, sub.clone()).await;
    s.subscribe(
        1,
        "quota/#",
        sub_opts(QoS::AtLeastOnce),
        Properties::default(),
    )
    .await;
    drop(s);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut p = connect(port, Protocol::V5, "quota-pub").await;
    let body = vec![b'q'; 64 << 10];
    let mut acked = Vec::new();
    let mut refused = false;
    for i in 1..=40u16 {
        p.send(&Packet::Publish(publish(
            "quota/x",
            QoS::AtLeastOnce,
            Some(i),
            &body,
        )))
        .await;
        let r = puback(&mut p).await;
        if r.reason == ReasonCode::QUOTA_EXCEEDED {
            refused = true;
            break;
        }
        assert!(!r.reason.is_error(), "{:?}", r.reason);
        acked.push(i);
    }
    assert!(refused, "40 x 64 KiB never filled a 1 MiB store");
    assert!(acked.len() >= 10, "only {} fitted in 1 MiB", acked.len());

    let (mut s, ack) = RawClient::connect(port, sub).await;
    assert!(ack.session_present);
    let mut got = 0;
    while let Ok(Packet::Publish(m)) = s.recv(Duration::from_millis(800)).await {
        got += 1;
        s.send(&Packet::PubAck(PubResponse::new(m.packet_id.unwrap())))
            .await;
    }
    assert!(
        got >= acked.len(),
        "{got} delivered of {} acknowledged",
        acked.len()
    );
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Drained: the quota has room again.
    p.send(&Packet::Publish(publish(
        "quota/x",
        QoS::AtLeastOnce,
        Some(100),
        &body,
    )))
    .await;
    assert!(
        !puback(&mut p).await.reason.is_error(),
        "accepted again once drained"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_length_is_bounded_when_lowered() {
    outpost_only!();
    let broker = Broker::start("max_topic_length = 32");
    let mut c = connect(broker.port(), Protocol::V5, "len").await;
    let o = sub_opts(QoS::AtMostOnce);
    let at = "a".repeat(32);
    let over = "a".repeat(33);
    assert_eq!(
        c.subscribe(1, &at, o, Properties::default()).await,
        ReasonCode::GRANTED_QOS_0
    );
    assert_eq!(
        c.subscribe(2, &over, o, Properties::default()).await,
        ReasonCode::TOPIC_FILTER_INVALID
    );
    c.send(&Packet::Publish(publish(
        &over,
        QoS::AtLeastOnce,
        Some(3),
        b"x",
    )))
    .await;
    assert_eq!(puback(&mut c).await.reason, ReasonCode::TOPIC_NAME_INVALID);
}
