//! The bridge over real, shaped links (tests/src/netlink.rs): cellular, satellite, a site
//! link that flaps, a silent black hole. The gateway runs in one network namespace, the
//! cloud Mosquitto in another, one veth pair between them. Each scenario checks what a
//! user relies on: every message the gateway acknowledged reaches the cloud, in order,
//! QoS 2 exactly once.
//!
//! Needs root (network namespaces), `ip`, `tc` and `nft`; scripts/test.sh installs
//! nftables. Publishers run inside the gateway namespace on a thread that entered it
//! (`NetLink::spawn_in_gateway`): the gateway listens on its namespace's loopback only,
//! as it would on a device, so no second veth is needed to reach it.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use outpost_mqtt::{Packet, Protocol, PubResponse, QoS};
use outpost_tests::broker::mosquitto_mode;
use outpost_tests::netlink::{Gateway, NetLink, Shape};
use outpost_tests::raw::{RawClient, RawError, connect_packet, publish};

/// Acknowledgements a publisher waits for before it calls the gateway stuck.
const ACK_WAIT: Duration = Duration::from_secs(15);

/// Publishes `n` messages on `topic` with payloads "0".."n-1", one every `every` (or as
/// fast as acknowledgements allow when zero, up to 50 in flight), and returns how many the
/// gateway acknowledged (PUBACK for QoS 1, PUBREC for QoS 2: acked means spooled).
async fn publish_paced(
    port: u16,
    client: String,
    topic: String,
    qos: QoS,
    n: u32,
    every: Duration,
) -> u32 {
    let (mut c, _) =
        RawClient::connect(port, connect_packet(Protocol::V3_1_1, &client, true)).await;
    let start = tokio::time::Instant::now();
    let (mut next, mut acked, mut done, mut inflight) = (0u32, 0u32, 0u32, 0u32);
    let mut last_progress = Instant::now();
    while done < n {
        let due = start + every * next;
        if next < n && inflight < 50 && tokio::time::Instant::now() >= due {
            let id = (next % 65_535) as u16 + 1;
            c.send(&Packet::Publish(publish(
                &topic,
                qos,
                Some(id),
                next.to_string().as_bytes(),
            )))
            .await;
            next += 1;
            inflight += 1;
            continue;
        }
        let wait = if next < n && inflight < 50 {
            due.saturating_duration_since(tokio::time::Instant::now())
                .max(Duration::from_millis(1))
        } else {
            Duration::from_millis(200)
        };
        match c.recv(wait).await {
            Ok(Packet::PubAck(_)) | Ok(Packet::PubComp(_)) => {
                done += 1;
                inflight -= 1;
                if qos == QoS::AtLeastOnce {
                    acked += 1;
                }
                last_progress = Instant::now();
            }
            Ok(Packet::PubRec(r)) => {
                acked += 1;
                c.send(&Packet::PubRel(PubResponse::new(r.packet_id))).await;
                last_progress = Instant::now();
            }
            Ok(other) => panic!("{client}: unexpected {other:?}"),
            Err(RawError::Timeout) => {}
            Err(e) => panic!("{client}: gateway connection failed: {e:?}"),
        }
        assert!(
            last_progress.elapsed() < ACK_WAIT || inflight == 0,
            "{client}: no acknowledgement from the gateway for {ACK_WAIT:?}"
        );
    }
    c.disconnect().await;
    acked
}

/// Starts a publisher in the gateway namespace.
fn spawn_publisher(
    link: &NetLink,
    gw: &Gateway,
    name: &str,
    qos: QoS,
    n: u32,
    every: Duration,
) -> tokio::task::JoinHandle<u32> {
    let topic = format!("{name}/reading");
    link.spawn_in_gateway(publish_paced(
        gw.port(),
        format!("pub-{name}"),
        topic,
        qos,
        n,
        every,
    ))
}

/// The gateway's config: one bridge through the link's relay, QoS 1 and QoS 2 rules.
fn gateway_config(link: &NetLink, keep_alive: &str, extra: &str) -> String {
    format!(
        r#"gateway_id = "gw-01"
[broker]
listeners = [{{ bind = "127.0.0.1:0" }}]
[[bridge]]
name = "cloud"
address = "{address}"
keep_alive = "{keep_alive}"
topics = [
  {{ pattern = "q1/#", direction = "out", qos = 1, remote_prefix = "up/" }},
  {{ pattern = "q2/#", direction = "out", qos = 2, remote_prefix = "up/" }},
]
reconnect = {{ min = "100ms", max = "1s", connect_timeout = "5s" }}
stats_interval = "1s"
{extra}
"#,
        address = link.cloud_address()
    )
}

/// Payloads that arrived on `topic`, in arrival order.
fn payloads(lines: &[String], topic: &str) -> Vec<u32> {
    lines
        .iter()
        .filter_map(|l| l.split_once(' '))
        .filter(|(t, _)| *t == topic)
        .map(|(_, p)| p.parse().unwrap_or(u32::MAX))
        .collect()
}

/// True once every payload 0..n arrived on both topics.
fn complete(lines: &[String], n1: u32, n2: u32) -> bool {
    let have =
        |t: &str, n: u32| payloads(lines, t).into_iter().collect::<HashSet<_>>().len() as u32 >= n;
    have("up/q1/reading", n1) && have("up/q2/reading", n2)
}

/// What is wrong with `got` against 0..n: missing values, repeats, the first disorder.
fn diagnose(got: &[u32], n: u32) -> String {
    let set: HashSet<u32> = got.iter().copied().collect();
    let missing: Vec<u32> = (0..n).filter(|v| !set.contains(v)).collect();
    let mut seen = HashSet::new();
    let repeats: Vec<u32> = got.iter().copied().filter(|p| !seen.insert(*p)).collect();
    let disorder = got
        .windows(2)
        .position(|w| w[1] < w[0])
        .map(|i| format!("{} then {} at index {i}", got[i], got[i + 1]));
    format!(
        "{} arrived; {} missing {:?}; {} repeated {:?}; first disorder: {}",
        got.len(),
        missing.len(),
        &missing[..missing.len().min(20)],
        repeats.len(),
        &repeats[..repeats.len().min(20)],
        disorder.as_deref().unwrap_or("none")
    )
}

/// Checks what the cloud collected: QoS 2 exactly 0..n2 in order; QoS 1 every one of
/// 0..n1, first arrivals in order (a resend after a reconnect may repeat). Returns the
/// QoS 1 duplicates.
fn verify(what: &str, lines: &[String], n1: u32, n2: u32, gw: &Gateway) -> usize {
    let q2 = payloads(lines, "up/q2/reading");
    assert!(
        q2 == (0..n2).collect::<Vec<_>>(),
        "{what}: QoS 2 not exactly once in order: {}\n{}",
        diagnose(&q2, n2),
        gw.log()
    );
    let q1 = payloads(lines, "up/q1/reading");
    let mut seen = HashSet::new();
    let first: Vec<u32> = q1.iter().copied().filter(|p| seen.insert(*p)).collect();
    assert!(
        first == (0..n1).collect::<Vec<_>>(),
        "{what}: QoS 1 lost or out of order: {}\n{}",
        diagnose(&q1, n1),
        gw.log()
    );
    q1.len() - first.len()
}

/// A backlog built while the site link is down, then drained over `shape` with live
/// traffic mixed in.
async fn backlog_then_live(what: &str, shape: Shape, backlog: u32, live: u32, every: Duration) {
    let mut link = NetLink::new();
    link.shape(shape);
    link.start_cloud("");
    let collector = link.collector("collector", "up/#", 120);
    link.link_up(false);
    let gw = link.start_gateway(&gateway_config(&link, "10s", ""));

    let b1 = spawn_publisher(&link, &gw, "q1", QoS::AtLeastOnce, backlog, Duration::ZERO);
    let b2 = spawn_publisher(&link, &gw, "q2", QoS::ExactlyOnce, backlog, Duration::ZERO);
    assert_eq!(b1.await.expect("q1 backlog"), backlog);
    assert_eq!(b2.await.expect("q2 backlog"), backlog);

    link.link_up(true);
    let began = Instant::now();
    // Live messages get their own numbers after the backlog's, on the same topics, so
    // order across backlog and live is checked too.
    let l1 = link.spawn_in_gateway(publish_offset(
        gw.port(),
        "q1",
        QoS::AtLeastOnce,
        backlog,
        live,
        every,
    ));
    let l2 = link.spawn_in_gateway(publish_offset(
        gw.port(),
        "q2",
        QoS::ExactlyOnce,
        backlog,
        live,
        every,
    ));
    assert_eq!(l1.await.expect("q1 live"), live);
    assert_eq!(l2.await.expect("q2 live"), live);

    let n = backlog + live;
    let lines = collector.wait_until(Duration::from_secs(50), |l| complete(l, n, n));
    let q1_dups = verify(what, &lines, n, n, &gw);
    eprintln!(
        "{what}: {} messages delivered in {:.1?} ({} QoS 1 duplicates, {} reconnects)",
        lines.len(),
        began.elapsed(),
        q1_dups,
        gw.count("connected to the cloud;").saturating_sub(1)
    );
}

/// A publisher numbering from `from`: payloads from..from+n on `{name}/reading`.
async fn publish_offset(
    port: u16,
    name: &'static str,
    qos: QoS,
    from: u32,
    n: u32,
    every: Duration,
) -> u32 {
    // The raw publisher numbers from 0; shift by publishing on the same topic with a
    // second client whose payloads are offset.
    let (mut c, _) = RawClient::connect(
        port,
        connect_packet(Protocol::V3_1_1, &format!("live-{name}"), true),
    )
    .await;
    let topic = format!("{name}/reading");
    let mut acked = 0u32;
    for i in 0..n {
        let id = (i % 65_535) as u16 + 1;
        c.send(&Packet::Publish(publish(
            &topic,
            qos,
            Some(id),
            (from + i).to_string().as_bytes(),
        )))
        .await;
        // One at a time: live traffic is a steady trickle, and waiting for each ack keeps
        // the numbering the gateway accepts identical to the order sent.
        loop {
            match c.expect_packet(ACK_WAIT).await {
                Packet::PubAck(_) => {
                    acked += 1;
                    break;
                }
                Packet::PubRec(r) => {
                    acked += 1;
                    c.send(&Packet::PubRel(PubResponse::new(r.packet_id))).await;
                }
                Packet::PubComp(_) => break,
                other => panic!("live {name}: unexpected {other:?}"),
            }
        }
        tokio::time::sleep(every).await;
    }
    c.disconnect().await;
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cellular_link_drains_a_backlog_with_live_traffic_losing_nothing() {
    if mosquitto_mode() {
        return;
    }
    backlog_then_live(
        "cellular",
        Shape::CELLULAR,
        1500,
        100,
        Duration::from_millis(50),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn satellite_link_drains_a_backlog_with_live_traffic_losing_nothing() {
    if mosquitto_mode() {
        return;
    }
    backlog_then_live(
        "satellite",
        Shape::SATELLITE,
        500,
        40,
        Duration::from_millis(100),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_site_link_loses_nothing() {
    if mosquitto_mode() {
        return;
    }
    let mut link = NetLink::new();
    // A site network: short delay, no loss, 2 Mbit/s; down 4 s every 10 s for 40 s (the
    // issue's 5 s every 30 s for 5 minutes, scaled to fit a CI minute). Keep alive 2 s, so
    // each outage outlasts 1.5 keep alives and the bridge drops and remakes the link
    // (with the default 60 s keep alive TCP would ride through a 5 s outage unseen).
    link.shape(Shape {
        delay: Duration::from_millis(20),
        loss_permille: 0,
        rate_kbit: 2000,
    });
    link.start_cloud("");
    let n = 1400u32;
    let every = Duration::from_millis(25);
    let collector = link.collector("collector", "up/#", 120);
    let gw = link.start_gateway(&gateway_config(&link, "2s", ""));
    assert!(
        gw.wait_for_log("connected to the cloud;", 1, Duration::from_secs(10)),
        "{}",
        gw.log()
    );
    let p1 = spawn_publisher(&link, &gw, "q1", QoS::AtLeastOnce, n, every);
    let p2 = spawn_publisher(&link, &gw, "q2", QoS::ExactlyOnce, n, every);
    let mut flaps = 0;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs(6)).await;
        link.link_up(false);
        tokio::time::sleep(Duration::from_secs(4)).await;
        link.link_up(true);
        flaps += 1;
    }
    assert_eq!(p1.await.expect("q1 publisher"), n);
    assert_eq!(p2.await.expect("q2 publisher"), n);
    let lines = collector.wait_until(Duration::from_secs(30), |l| complete(l, n, n));
    let dups = verify("flapping", &lines, n, n, &gw);
    // Every outage outlasted 1.5 keep alives: each one is noticed, and each is followed by
    // a new connection (the last may still be on its way).
    let timeouts = gw.count("keep alive timeout");
    assert!(
        timeouts >= 1,
        "the outages were meant to outlast the keep alive: none noticed\n{}",
        gw.log()
    );
    assert!(
        gw.wait_for_log(
            "connected to the cloud;",
            timeouts + 1,
            Duration::from_secs(15)
        ),
        "no reconnect after an outage\n{}",
        gw.log()
    );
    let reconnects = gw.count("connected to the cloud;") - 1;
    eprintln!(
        "flapping: {flaps} flaps, {} messages delivered, {dups} QoS 1 duplicates, {} reconnects, {} keep-alive timeouts",
        lines.len(),
        reconnects,
        timeouts
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_black_hole_is_noticed_within_one_and_a_half_keep_alives_and_heals() {
    if mosquitto_mode() {
        return;
    }
    let mut link = NetLink::new();
    link.shape(Shape {
        delay: Duration::from_millis(50),
        loss_permille: 0,
        rate_kbit: 1000,
    });
    link.start_cloud("");
    let n = 600u32;
    let every = Duration::from_millis(40);
    let collector = link.collector("collector", "up/#", 120);
    let keep_alive = Duration::from_secs(4);
    let gw = link.start_gateway(&gateway_config(&link, "4s", ""));
    assert!(
        gw.wait_for_log("connected to the cloud;", 1, Duration::from_secs(10)),
        "{}",
        gw.log()
    );
    let p1 = spawn_publisher(&link, &gw, "q1", QoS::AtLeastOnce, n, every);
    let p2 = spawn_publisher(&link, &gw, "q2", QoS::ExactlyOnce, n, every);
    tokio::time::sleep(Duration::from_secs(3)).await;

    link.black_hole(true);
    let hole = Instant::now();
    // The bridge pings after a keep alive without traffic from the cloud and gives up
    // 1.5 keep alives after the last packet it received (which came before the hole).
    // The slack covers the bridge's 1 s-scale timer tick and the log pipe.
    let limit = keep_alive + keep_alive / 2 + Duration::from_secs(1);
    assert!(
        gw.wait_for_log("keep alive timeout", 1, limit),
        "the bridge did not notice the black hole within {limit:?}\n{}",
        gw.log()
    );
    let noticed = hole.elapsed();
    // Hold the hole well past the detection, so reconnect attempts fail into it.
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(noticed)).await;
    let connects_before = gw.count("connected to the cloud;");
    link.black_hole(false);
    let healed = Instant::now();
    assert!(
        gw.wait_for_log(
            "connected to the cloud;",
            connects_before + 1,
            Duration::from_secs(20)
        ),
        "no reconnect after the path healed\n{}",
        gw.log()
    );
    let reconnected = healed.elapsed();

    assert_eq!(p1.await.expect("q1 publisher"), n);
    assert_eq!(p2.await.expect("q2 publisher"), n);
    let lines = collector.wait_until(Duration::from_secs(30), |l| complete(l, n, n));
    let dups = verify("black hole", &lines, n, n, &gw);
    eprintln!(
        "black hole: noticed after {noticed:.1?} (keep alive {keep_alive:?}), reconnected {reconnected:.1?} after the path healed; {} messages delivered, {dups} QoS 1 duplicates",
        lines.len()
    );
}
