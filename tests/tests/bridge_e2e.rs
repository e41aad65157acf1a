//! The store-and-forward bridge inside the real `outpost` binary, with a real Mosquitto
//! as the cloud (DESIGN.md, Contracts): messages acknowledged by the gateway during a
//! cloud outage all arrive, in order, QoS 2 once; a `kill -9` of the gateway while its
//! backlog drains loses nothing and duplicates no QoS 2 message; the gateway's birth and
//! will reach the cloud.

use std::process::Command;
use std::time::{Duration, Instant};

use outpost_mqtt::{Packet, Protocol, QoS};
use outpost_tests::V4Client;
use outpost_tests::broker::{Broker, mosquitto_mode};
use outpost_tests::cloud::{Cloud, CloudSubscriber, by_topic, publish_acked};
use outpost_tests::raw::{RawClient, connect_packet, publish};
use rumqttc::QoS as Q4;

const WAIT: Duration = Duration::from_secs(10);

fn gateway_config(cloud: &Cloud, extra: &str) -> String {
    format!(
        r#"gateway_id = "gw-e2e"
[broker]
listeners = [{{ bind = "127.0.0.1:0" }}]
[[bridge]]
name = "cloud"
address = "mqtt://127.0.0.1:{port}"
topics = [
  {{ pattern = "q1/#", direction = "out", qos = 1, remote_prefix = "up/" }},
  {{ pattern = "q2/#", direction = "out", qos = 2, remote_prefix = "up/" }},
]
reconnect = {{ min = "100ms", max = "500ms" }}
{extra}
"#,
        port = cloud.port
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_outage_loses_nothing_keeps_order_and_qos2_arrives_once() {
    if mosquitto_mode() {
        return;
    }
    let mut cloud = Cloud::down_with_collector();

    let broker = Broker::outpost_with_full_config(&gateway_config(&cloud, ""));
    let (n1, n2) = (300u16, 200u16);
    publish_acked(broker.port(), "pub-q1", "q1/meter", QoS::AtLeastOnce, n1).await;
    publish_acked(broker.port(), "pub-q2", "q2/valve", QoS::ExactlyOnce, n2).await;

    cloud.start();
    let got = CloudSubscriber::start(&cloud, "collector", "up/#", usize::from(n1 + n2), 20).wait();
    let m = by_topic(&got);
    let expect = |n: u16| (0..u32::from(n)).collect::<Vec<_>>();
    assert_eq!(
        m.get("up/q1/meter"),
        Some(&expect(n1)),
        "QoS 1: all, in order\n{}",
        broker.log()
    );
    assert_eq!(
        m.get("up/q2/valve"),
        Some(&expect(n2)),
        "QoS 2: all, in order, once"
    );
    // What an operator reads: the backlog found on connecting, and the drain's end;
    // the failed attempts while the cloud was down are one warning, not one per retry.
    assert!(
        broker.wait_for_log("drained 500 messages in", 1, WAIT),
        "{}",
        broker.log()
    );
    let log = broker.log();
    assert!(
        log.contains("connected to the cloud; 500 messages ("),
        "no backlog on connect:\n{log}"
    );
    assert_eq!(log.matches("cannot connect").count(), 1, "{log}");
}

/// A clean stop folds the spool's WAL into its file: the rows' second copy is written
/// then (flash writes are counted where they happen, and a file copied off the card stands
/// alone), and the restarted gateway still sends every message once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_folds_the_spool_into_its_file_and_the_restart_sends_it_all() {
    if mosquitto_mode() {
        return;
    }
    let mut cloud = Cloud::down_with_collector();
    let mut broker = Broker::outpost_with_full_config(&gateway_config(&cloud, ""));
    let n = 150u16;
    publish_acked(broker.port(), "pub-ckpt", "q1/ckpt", QoS::AtLeastOnce, n).await;
    assert!(broker.stop_gracefully().is_some(), "{}", broker.log());

    let spool = broker.state_dir().join("bridge-cloud.sqlite");
    let wal = broker.state_dir().join("bridge-cloud.sqlite-wal");
    let wal_len = std::fs::metadata(&wal).map_or(0, |m| m.len());
    assert_eq!(
        wal_len, 0,
        "the WAL is folded into the file at a clean stop"
    );
    // The file alone, without its WAL and shared-memory files, holds every row.
    let copy = tempfile::tempdir().unwrap();
    std::fs::copy(&spool, copy.path().join("spool.sqlite")).unwrap();
    let rows: i64 = rusqlite::Connection::open(copy.path().join("spool.sqlite"))
        .unwrap()
        .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, i64::from(n));

    broker.restart();
    cloud.start();
    let got = CloudSubscriber::start(&cloud, "collector", "up/#", usize::from(n), 20).wait();
    assert_eq!(
        by_topic(&got).get("up/q1/ckpt"),
        Some(&(0..u32::from(n)).collect::<Vec<_>>()),
        "all, in order, once\n{}",
        broker.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_kill9_while_draining_loses_nothing_and_duplicates_no_qos2() {
    if mosquitto_mode() {
        return;
    }
    let mut cloud = Cloud::down_with_collector();

    // A replay rate limit makes the drain slow enough to be interrupted.
    let mut broker = Broker::outpost_with_full_config(&gateway_config(&cloud, "replay_rate = 200"));
    let n = 600u16;
    publish_acked(broker.port(), "pub-q2", "q2/valve", QoS::ExactlyOnce, n).await;
    publish_acked(broker.port(), "pub-q1", "q1/meter", QoS::AtLeastOnce, n).await;

    cloud.start();
    let sub = CloudSubscriber::start(&cloud, "collector", "up/#", 100_000, 25);
    let deadline = Instant::now() + WAIT;
    while sub.lines().len() < 100 {
        assert!(
            Instant::now() < deadline,
            "the backlog did not start draining\n{}",
            broker.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    broker.kill9();
    let at_kill = sub.lines().len();
    assert!(
        at_kill < usize::from(2 * n),
        "drain finished before the kill; nothing tested"
    );
    broker.restart();

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = by_topic(&sub.lines());
        let q2 = m.get("up/q2/valve").map_or(0, Vec::len);
        let q1: std::collections::HashSet<_> = m.get("up/q1/meter").into_iter().flatten().collect();
        if q2 >= usize::from(n) && q1.len() >= usize::from(n) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not all arrived after restart: q2 {q2}, q1 {}\n{}",
            q1.len(),
            broker.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let any late duplicate arrive before judging.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m = by_topic(&sub.lines());
    let q2 = &m["up/q2/valve"];
    let mut sorted = q2.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), q2.len(), "a QoS 2 message arrived twice");
    assert_eq!(
        sorted,
        (0..u32::from(n)).collect::<Vec<_>>(),
        "QoS 2 messages lost"
    );
    let mut q1 = m["up/q1/meter"].clone();
    q1.sort_unstable();
    q1.dedup();
    assert_eq!(
        q1,
        (0..u32::from(n)).collect::<Vec<_>>(),
        "QoS 1 messages lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn birth_on_connect_will_on_kill9_clean_offline_on_shutdown() {
    if mosquitto_mode() {
        return;
    }
    let mut cloud = Cloud::new();
    cloud.start();
    let status = "outpost/gw-e2e/status";
    let mut broker = Broker::outpost_with_full_config(&gateway_config(&cloud, ""));

    let retained = |cloud: &Cloud| -> String {
        let out = Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &cloud.port.to_string(),
                "-t",
                status,
                "-C",
                "1",
                "-W",
                "5",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let wait_for = |cloud: &Cloud, word: &str| {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = retained(cloud);
            if s.contains(word) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "status never said {word}: last {s:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let birth = wait_for(&cloud, "online");
    assert!(birth.starts_with('{'), "birth is JSON: {birth}");

    broker.kill9();
    let will = wait_for(&cloud, "offline");
    assert!(
        will.contains("unexpected"),
        "an unexpected death says so: {will}"
    );

    broker.restart();
    wait_for(&cloud, "online");
    broker.stop_gracefully();
    let bye = wait_for(&cloud, "offline");
    assert!(bye.contains("clean"), "a clean shutdown says so: {bye}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_spool_with_reject_new_acknowledges_only_what_it_kept() {
    if mosquitto_mode() {
        return;
    }
    let mut cloud = Cloud::down_with_collector();
    let broker = Broker::outpost_with_full_config(&gateway_config(
        &cloud,
        r#"spool = { max_bytes = "4KiB", when_full = "reject-new" }"#,
    ));

    // A 5.0 publisher learns of each refusal (0x97 Quota exceeded) and keeps going.
    let (mut c, _) = RawClient::connect(
        broker.port(),
        connect_packet(Protocol::V5, "pub-full", true),
    )
    .await;
    let mut kept = Vec::new();
    let mut refused = 0;
    for i in 0..100u16 {
        let payload = format!("{i:03}{}", "x".repeat(97));
        match publish_q1_big(&mut c, i + 1, &payload).await {
            outpost_mqtt::ReasonCode::SUCCESS => kept.push(u32::from(i)),
            reason => {
                assert_eq!(reason, outpost_mqtt::ReasonCode::QUOTA_EXCEEDED);
                refused += 1;
            }
        }
    }
    assert!(
        !kept.is_empty() && refused > 0,
        "kept {} refused {refused}: the bound was not reached",
        kept.len()
    );
    c.disconnect().await;

    cloud.start();
    let got = CloudSubscriber::start(&cloud, "collector", "up/#", kept.len() + 1, 5).wait();
    let arrived: Vec<u32> = got
        .iter()
        .filter_map(|l| l.split_once(' '))
        .map(|(_, p)| p[..3].parse().unwrap())
        .collect();
    assert_eq!(
        arrived,
        kept,
        "the cloud must get exactly the acknowledged messages\n{}",
        broker.log()
    );
}

/// Publishes `payload` at QoS 1 on the spooled topic `q1/big`; the PUBACK's reason.
async fn publish_q1_big(
    c: &mut RawClient,
    packet_id: u16,
    payload: &str,
) -> outpost_mqtt::ReasonCode {
    ack_q1_big(c, QoS::AtLeastOnce, packet_id, payload)
        .await
        .reason
}

/// Publishes `payload` at `qos` (1 or 2) on the spooled topic `q1/big`; its PUBACK or
/// PUBREC.
async fn ack_q1_big(
    c: &mut RawClient,
    qos: QoS,
    packet_id: u16,
    payload: &str,
) -> outpost_mqtt::PubResponse {
    c.send(&Packet::Publish(publish(
        "q1/big",
        qos,
        Some(packet_id),
        payload.as_bytes(),
    )))
    .await;
    match (qos, c.expect_packet(WAIT).await) {
        (QoS::AtLeastOnce, Packet::PubAck(a)) | (QoS::ExactlyOnce, Packet::PubRec(a)) => a,
        (_, other) => panic!("PUBLISH {packet_id}: unexpected answer {other:?}"),
    }
}

/// MQTT-4.3.3-4 and section 4.9: a PUBREC with a failure code ends the QoS 2 exchange,
/// so a later PUBLISH with the same packet id is a new message (MQTT-4.3.3-9 applies
/// only before PUBREL). With a full `reject-new` spool it must be offered to the spool
/// again and refused again, never taken for a duplicate and answered with success while
/// nothing was kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_qos2_packet_id_is_not_mistaken_for_a_duplicate() {
    if mosquitto_mode() {
        return;
    }
    let (_cloud, _broker, mut c) = gateway_with_full_spool("pub-q2").await;
    let payload = "x".repeat(100);
    for attempt in 1..=2 {
        let reason = ack_q1_big(&mut c, QoS::ExactlyOnce, 7, &payload)
            .await
            .reason;
        assert_eq!(
            reason,
            outpost_mqtt::ReasonCode::QUOTA_EXCEEDED,
            "attempt {attempt}: a full spool must refuse, not acknowledge"
        );
    }
    // MQTT-3.3.4-9 counts only exchanges still open: refused ones are over, so more of
    // them than our Receive Maximum (100), one at a time, must not end in 0x93.
    for id in 1000..1120u16 {
        let reason = ack_q1_big(&mut c, QoS::ExactlyOnce, id, &payload)
            .await
            .reason;
        assert_eq!(
            reason,
            outpost_mqtt::ReasonCode::QUOTA_EXCEEDED,
            "refusal {id}"
        );
    }
}

/// A gateway whose bridge spool (4 KiB, `reject-new`, cloud down) is full, and the 5.0
/// client `id` that filled it.
async fn gateway_with_full_spool(id: &str) -> (Cloud, Broker, RawClient) {
    // The cloud never starts: the spool only fills.
    let cloud = Cloud::new();
    let broker = Broker::outpost_with_full_config(&gateway_config(
        &cloud,
        r#"spool = { max_bytes = "4KiB", when_full = "reject-new" }"#,
    ));
    let (mut c, _) =
        RawClient::connect(broker.port(), connect_packet(Protocol::V5, id, true)).await;
    let payload = "x".repeat(100);
    let mut full = false;
    for i in 0..200u16 {
        if publish_q1_big(&mut c, i + 1, &payload).await == outpost_mqtt::ReasonCode::QUOTA_EXCEEDED
        {
            full = true;
            break;
        }
    }
    assert!(full, "the 4 KiB spool never filled");
    (cloud, broker, c)
}

/// A refusal's PUBACK carries a Reason String only when the client may take one:
/// MQTT-3.1.2-29 (Request Problem Information 0 forbids it outside PUBLISH, CONNACK and
/// DISCONNECT) and MQTT-3.4.2-2 (not when it would exceed the client's Maximum Packet
/// Size). The reason code itself always arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_s_reason_string_honours_problem_information_and_packet_size() {
    if mosquitto_mode() {
        return;
    }
    let (_cloud, broker, mut filler) = gateway_with_full_spool("pub-rs-default").await;
    let payload = "x".repeat(100);

    // The default (Request Problem Information 1): the refusal says why.
    let why = refused_puback(&mut filler, 500, &payload).await;
    assert!(
        why.properties
            .reason_string
            .as_deref()
            .is_some_and(|s| !s.is_empty()),
        "{why:?}"
    );

    let mut quiet = connect_packet(Protocol::V5, "pub-rs-quiet", true);
    quiet.properties.request_problem_information = Some(0);
    let (mut quiet, _) = RawClient::connect(broker.port(), quiet).await;
    let ack = refused_puback(&mut quiet, 1, &payload).await;
    assert_eq!(ack.properties.reason_string, None, "MQTT-3.1.2-29: {ack:?}");
    assert!(ack.properties.user_properties.is_empty(), "{ack:?}");

    let mut small = connect_packet(Protocol::V5, "pub-rs-small", true);
    small.properties.maximum_packet_size = Some(30);
    let (mut small, _) = RawClient::connect(broker.port(), small).await;
    let ack = refused_puback(&mut small, 1, &payload).await;
    assert_eq!(ack.properties.reason_string, None, "MQTT-3.4.2-2: {ack:?}");
}

/// Publishes at QoS 1 on the spooled topic and expects a 0x97 PUBACK, returned whole.
async fn refused_puback(
    c: &mut RawClient,
    packet_id: u16,
    payload: &str,
) -> outpost_mqtt::PubResponse {
    let a = ack_q1_big(c, QoS::AtLeastOnce, packet_id, payload).await;
    assert_eq!(a.reason, outpost_mqtt::ReasonCode::QUOTA_EXCEEDED, "{a:?}");
    a
}

/// A TCP relay between the bridge and the cloud that can swallow the bridge's PUBRELs
/// and cut every link, to leave the cloud holding QoS 2 exchanges at a reconnect.
struct Relay {
    port: u16,
    drop_pubrel: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::watch::Sender<u32>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(cloud_port: u16) -> Relay {
        use std::sync::atomic::Ordering::Relaxed;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let drop_pubrel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (cut, cut_rx) = tokio::sync::watch::channel(0u32);
        let flag = drop_pubrel.clone();
        let task = tokio::spawn(async move {
            while let Ok((bridge, _)) = listener.accept().await {
                let Ok(cloud) = tokio::net::TcpStream::connect(("127.0.0.1", cloud_port)).await
                else {
                    continue;
                };
                let (mut br, mut bw) = bridge.into_split();
                let (mut cr, mut cw) = cloud.into_split();
                let (flag, mut cut1, mut cut2) = (flag.clone(), cut_rx.clone(), cut_rx.clone());
                cut1.borrow_and_update();
                cut2.borrow_and_update();
                // Cloud to bridge: verbatim.
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        tokio::select! {
                            n = cr.read(&mut buf) => match n {
                                Ok(n) if n > 0 => if bw.write_all(&buf[..n]).await.is_err() { break },
                                _ => break,
                            },
                            _ = cut1.changed() => break,
                        }
                    }
                });
                // Bridge to cloud: packet by packet, PUBRELs dropped while asked.
                tokio::spawn(async move {
                    let mut pending = bytes::BytesMut::new();
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        tokio::select! {
                            n = br.read(&mut buf) => match n {
                                Ok(n) if n > 0 => pending.extend_from_slice(&buf[..n]),
                                _ => break,
                            },
                            _ = cut2.changed() => break,
                        }
                        let mut out = Vec::new();
                        while let Some(len) = frame_len(&pending) {
                            let frame = pending.split_to(len);
                            if frame[0] >> 4 == 6 && flag.load(Relaxed) {
                                continue;
                            }
                            out.extend_from_slice(&frame);
                        }
                        if cw.write_all(&out).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Relay {
            port,
            drop_pubrel,
            cut,
            task,
        }
    }

    fn cut_all(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.cut_all();
    }
}

/// Length of the whole MQTT packet at the front of `b`, once it is all there.
fn frame_len(b: &[u8]) -> Option<usize> {
    let mut len = 0usize;
    for (i, byte) in b.iter().enumerate().skip(1).take(4) {
        len |= usize::from(byte & 0x7F) << (7 * (i - 1));
        if byte & 0x80 == 0 {
            let total = i + 1 + len;
            return (b.len() >= total).then_some(total);
        }
    }
    None
}

/// Section 4.9: QoS 2 exchanges awaiting PUBREL still count against the cloud's Receive
/// Maximum after a reconnect. With a full window of them at the cloud (Mosquitto's 20),
/// the bridge must release them before it sends anything new, its birth included:
/// otherwise Mosquitto refuses the birth (0x97, status left "offline") and, with
/// `max_queued_messages 0`, drops the link again at every reconnect, and the spool never
/// drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_with_the_cloud_s_qos2_window_full_releases_first_and_loses_nothing() {
    use std::sync::atomic::Ordering::Relaxed;
    if mosquitto_mode() {
        return;
    }
    let mut cloud = Cloud::with_limits("max_queued_messages 0\nmax_inflight_messages 20\n");
    cloud.start();
    CloudSubscriber::register(&cloud, "collector", "up/#");
    let relay = Relay::start(cloud.port).await;
    let broker = Broker::outpost_with_full_config(&format!(
        r#"gateway_id = "gw-e2e"
[broker]
listeners = [{{ bind = "127.0.0.1:0" }}]
[[bridge]]
name = "cloud"
address = "mqtt://127.0.0.1:{port}"
topics = [{{ pattern = "q2/#", direction = "out", qos = 2, remote_prefix = "up/" }}]
reconnect = {{ min = "100ms", max = "500ms" }}
"#,
        port = relay.port
    ));
    let sub = CloudSubscriber::start(&cloud, "collector", "up/#", 100_000, 30);

    // The cloud takes 20 QoS 2 PUBLISHes and answers PUBREC; their PUBRELs never reach
    // it. The link then breaks and comes back.
    relay.drop_pubrel.store(true, Relaxed);
    publish_acked(broker.port(), "pub-a", "q2/a", QoS::ExactlyOnce, 40).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.cut_all();
    relay.drop_pubrel.store(false, Relaxed);
    publish_acked(broker.port(), "pub-b", "q2/b", QoS::ExactlyOnce, 40).await;

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = by_topic(&sub.lines());
        let (a, b) = (
            m.get("up/q2/a").map_or(0, Vec::len),
            m.get("up/q2/b").map_or(0, Vec::len),
        );
        if a >= 40 && b >= 40 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the spool did not drain: a {a}, b {b} of 40 each\n{}",
            broker.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m = by_topic(&sub.lines());
    let expect: Vec<u32> = (0..40).collect();
    assert_eq!(m["up/q2/a"], expect, "QoS 2: all, in order, once");
    assert_eq!(m["up/q2/b"], expect, "QoS 2: all, in order, once");

    // The cloud holds the birth, not the will of the broken link.
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &cloud.port.to_string()])
        .args(["-t", "outpost/gw-e2e/status", "-C", "1", "-W", "5"])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains("online"),
        "status at the cloud: {status}\n{}",
        broker.log()
    );
}

/// What the cloud sends down an `in` rule reaches local subscribers through the gateway's
/// publish loop, in order, under the local prefix; and a topic that an `out` rule also
/// matches is not sent back up to the cloud (it is not offered to the bridge it came
/// from), so a `both`-style mapping cannot loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_commands_come_down_in_order_and_are_not_echoed_back_up() {
    if mosquitto_mode() {
        return;
    }
    let mut cloud = Cloud::new();
    cloud.start();
    let broker = Broker::outpost_with_full_config(&format!(
        r##"gateway_id = "gw-down"
[broker]
listeners = [{{ bind = "127.0.0.1:0" }}]
[[bridge]]
name = "cloud"
address = "mqtt://127.0.0.1:{port}"
topics = [
  {{ pattern = "cmd/#", direction = "in", qos = 1, local_prefix = "local/", remote_prefix = "gw-down/" }},
  {{ pattern = "#", direction = "out", qos = 1, local_prefix = "local/", remote_prefix = "gw-down/" }},
]
reconnect = {{ min = "100ms", max = "500ms" }}
[bridge.status]
enabled = false
"##,
        port = cloud.port
    ));
    let (mut local, _) = V4Client::connect(broker.port(), "local-sub", |_| {}).await;
    local
        .client
        .subscribe("local/cmd/#", Q4::AtLeastOnce)
        .await
        .unwrap();
    local.expect_suback().await;
    // Everything on the cloud under the gateway's prefix: the commands, and any echo.
    let watcher = CloudSubscriber::start(&cloud, "watcher", "gw-down/#", 100_000, 8);
    // The bridge subscribes on connect; wait until a command makes it through.
    let deadline = Instant::now() + WAIT;
    loop {
        let out = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &cloud.port.to_string()])
            .args(["-q", "1", "-t", "gw-down/cmd/probe", "-m", "probe"])
            .output()
            .expect("mosquitto_pub");
        assert!(out.status.success());
        if local
            .next_publish(Duration::from_millis(500))
            .await
            .is_some()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no command came down\n{}",
            broker.log()
        );
    }
    let n = 50;
    let lines: String = (0..n).map(|i| format!("{i}\n")).collect();
    let mut pubber = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &cloud.port.to_string()])
        .args(["-q", "1", "-t", "gw-down/cmd/valve", "-l"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_pub");
    use std::io::Write as _;
    pubber
        .stdin
        .take()
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
    assert!(pubber.wait().unwrap().success());
    // Late copies of the probe may still come down first; count only the valve commands.
    let mut got = Vec::new();
    let deadline = Instant::now() + WAIT;
    while got.len() < n && Instant::now() < deadline {
        if let Some(p) = local.next_publish(Duration::from_millis(500)).await
            && p.topic == "local/cmd/valve"
        {
            got.push(String::from_utf8_lossy(&p.payload).into_owned());
        }
    }
    assert_eq!(got, (0..n).map(|i| i.to_string()).collect::<Vec<_>>());
    // The watcher saw each command once (as published on the cloud), never a copy the
    // gateway sent back up under the same topic.
    let seen = watcher.wait();
    let valve: Vec<&String> = seen
        .iter()
        .filter(|l| l.starts_with("gw-down/cmd/valve "))
        .collect();
    assert_eq!(
        valve.len(),
        n,
        "echoed back up:\n{seen:?}\n{}",
        broker.log()
    );
}
