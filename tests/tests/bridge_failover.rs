//! A bridge with two cloud addresses (two real, independent Mosquittos): the node the
//! bridge is on is killed with SIGKILL mid-stream; the bridge moves to the other one, and
//! (with `round_robin = false`) back to the primary once it is up again. Asserted per
//! broker: nothing the gateway acknowledged is lost (every message reaches one of them),
//! order is kept at each, and no QoS 2 message reaches any one broker twice.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use outpost_mqtt::{Packet, Protocol, PubResponse, QoS};
use outpost_tests::broker::{Broker, mosquitto_mode};
use outpost_tests::cloud::{Cloud, by_topic};
use outpost_tests::raw::{RawClient, connect_packet, publish};

const WAIT: Duration = Duration::from_secs(20);

/// Publishes payloads `from..to` on `topic` and waits for every acknowledgement, keeping
/// up to 20 in flight and pausing between groups so the stream lasts a while.
async fn publish_acked(port: u16, client: &str, topic: &str, qos: QoS, from: u32, to: u32) {
    let (mut c, _) = RawClient::connect(port, connect_packet(Protocol::V3_1_1, client, true)).await;
    let (mut next, mut done, mut inflight) = (from, from, 0u32);
    while done < to {
        while next < to && inflight < 20 {
            let pid = (next % 60_000 + 1) as u16;
            c.send(&Packet::Publish(publish(
                topic,
                qos,
                Some(pid),
                next.to_string().as_bytes(),
            )))
            .await;
            next += 1;
            inflight += 1;
        }
        match c.expect_packet(WAIT).await {
            Packet::PubAck(_) | Packet::PubComp(_) => {
                done += 1;
                inflight -= 1;
                if done % 20 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            Packet::PubRec(r) => c.send(&Packet::PubRel(PubResponse::new(r.packet_id))).await,
            other => panic!("unexpected {other:?}"),
        }
    }
    c.disconnect().await;
}

/// A persistent session at a cloud node printing what it receives on `up/#`.
///
/// It subscribes with QoS 1 on purpose: a QoS 2 subscriber (libmosquitto) prints a message
/// only once the node's PUBREL arrives, so a node killed between its PUBREC and PUBREL
/// would hide a message it had taken, and the test would blame the bridge for it. With
/// QoS 1 each PUBLISH the node sends is printed; a duplicate sent by the bridge to the
/// node still shows as two lines.
struct Collector {
    child: std::process::Child,
    out: tempfile::NamedTempFile,
}

impl Collector {
    fn run(cloud: &Cloud, id: &str, exit_at_once: bool) -> Collector {
        let out = tempfile::NamedTempFile::new().unwrap();
        let child = std::process::Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &cloud.port.to_string(),
                "-i",
                id,
                "-c",
            ])
            .args([
                "-q",
                "1",
                "-t",
                "up/#",
                "-v",
                "-W",
                if exit_at_once { "1" } else { "120" },
            ])
            .stdout(out.reopen().unwrap())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto_sub (apt-get install mosquitto-clients)");
        Collector { child, out }
    }

    /// Starts collecting (the session was registered before).
    fn start(cloud: &Cloud, id: &str) -> Collector {
        Collector::run(cloud, id, false)
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.out.path())
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Stops it and returns everything it printed.
    fn stop(mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.lines()
    }
}

/// A cloud node with persistent sessions for `collectors` (saved to its database),
/// running.
fn node_with_collectors(collectors: &[&str]) -> Cloud {
    let mut cloud = Cloud::new();
    cloud.start();
    for id in collectors {
        let mut c = Collector::run(&cloud, id, true);
        let _ = c.child.wait();
    }
    // SIGTERM saves the sessions; a later SIGKILL goes back to this state.
    cloud.stop();
    cloud.start();
    cloud
}

fn gateway_config(a: &Cloud, b: &Cloud, extra: &str) -> String {
    format!(
        r#"gateway_id = "gw-fo"
[broker]
listeners = [{{ bind = "127.0.0.1:0" }}]
[[bridge]]
name = "cloud"
address = ["mqtt://127.0.0.1:{a}", "mqtt://127.0.0.1:{b}"]
stats_interval = "1s"
topics = [
  {{ pattern = "q1/#", direction = "out", qos = 1, remote_prefix = "up/" }},
  {{ pattern = "q2/#", direction = "out", qos = 2, remote_prefix = "up/" }},
]
reconnect = {{ min = "100ms", max = "500ms", connect_timeout = "2s" }}
{extra}
"#,
        a = a.port,
        b = b.port
    )
}

async fn wait_log(broker: &Broker, needle: &str, times: usize) {
    let deadline = Instant::now() + WAIT;
    while broker.log().matches(needle).count() < times {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} ({times}x) in the log:\n{}",
            broker.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks what one subscriber at one broker got: QoS 2 at most once and in order; QoS 1
/// in order once repeats (allowed, at least once) are set aside.
fn check_subscriber(who: &str, lines: &[String]) {
    let m = by_topic(lines);
    if let Some(q2) = m.get("up/q2/valve") {
        for w in q2.windows(2) {
            assert!(
                w[0] < w[1],
                "{who}: QoS 2 duplicated or out of order: {w:?} in {q2:?}"
            );
        }
    }
    if let Some(q1) = m.get("up/q1/meter") {
        let mut newest = None;
        let mut seen = BTreeSet::new();
        for &p in q1 {
            if seen.insert(p) {
                assert!(
                    newest < Some(p),
                    "{who}: QoS 1 out of order: {p} after {newest:?}"
                );
                newest = Some(p);
            }
        }
    }
}

/// Every payload of `topic` in `0..n` reached at least one subscriber.
fn missing(all: &[&[String]], topic: &str, n: u32) -> Vec<u32> {
    let got: BTreeSet<u32> = all
        .iter()
        .flat_map(|l| by_topic(l).remove(topic).unwrap_or_default())
        .collect();
    (0..n).filter(|p| !got.contains(p)).collect()
}

async fn local_sys(port: u16, key: &str) -> String {
    let out = tokio::process::Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-C",
            "1",
            "-W",
            "5",
        ])
        .args(["-t", &format!("$SYS/broker/bridge/cloud/{key}")])
        .output()
        .await
        .expect("mosquitto_sub");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_node_in_use_moves_to_the_standby_and_back_losing_nothing() {
    if mosquitto_mode() {
        return;
    }
    let mut a = node_with_collectors(&["a1", "a2"]);
    let b = node_with_collectors(&["b1"]);
    let addr_a = format!("mqtt://127.0.0.1:{}", a.port);
    let addr_b = format!("mqtt://127.0.0.1:{}", b.port);
    let a1 = Collector::start(&a, "a1");
    let b1 = Collector::start(&b, "b1");

    let broker = Broker::outpost_with_full_config(&gateway_config(
        &a,
        &b,
        "round_robin = false\nprimary_retry = \"1s\"",
    ));
    wait_log(&broker, &format!("waiting in the spool; using {addr_a}"), 1).await;

    // Phase 1: a stream of QoS 1 and QoS 2 messages; node A dies in the middle of it.
    let n1 = 3000u32;
    let port = broker.port();
    let p1 = tokio::spawn(async move {
        publish_acked(port, "pub-q1", "q1/meter", QoS::AtLeastOnce, 0, n1).await;
    });
    let p2 = tokio::spawn(async move {
        publish_acked(port, "pub-q2", "q2/valve", QoS::ExactlyOnce, 0, n1).await;
    });
    let deadline = Instant::now() + WAIT;
    while a1.lines().len() < 400 {
        assert!(
            Instant::now() < deadline,
            "nothing reached A\n{}",
            broker.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.kill9();
    let a1 = a1.stop();
    assert!(
        a1.len() < 2 * n1 as usize,
        "the stream was over before the kill; nothing tested"
    );
    wait_log(&broker, &format!("waiting in the spool; using {addr_b}"), 1).await;
    p1.await.unwrap();
    p2.await.unwrap();
    assert_eq!(
        local_sys(port, "address").await,
        addr_b,
        "address in use on $SYS"
    );

    // Phase 2: A is back; the bridge returns to it (round_robin = false) and the stream
    // goes on there.
    a.start();
    let a2 = Collector::start(&a, "a2");
    wait_log(&broker, "the primary address is reachable again", 1).await;
    wait_log(&broker, &format!("waiting in the spool; using {addr_a}"), 2).await;
    let n = n1 + 500;
    publish_acked(port, "pub-q1", "q1/meter", QoS::AtLeastOnce, n1, n).await;
    publish_acked(port, "pub-q2", "q2/valve", QoS::ExactlyOnce, n1, n).await;

    let deadline = Instant::now() + WAIT;
    loop {
        let (l2, lb) = (a2.lines(), b1.lines());
        let all: [&[String]; 3] = [&a1, &l2, &lb];
        let (m1, m2) = (
            missing(&all, "up/q1/meter", n),
            missing(&all, "up/q2/valve", n),
        );
        if m1.is_empty() && m2.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "acknowledged messages lost: QoS 1 {m1:?}, QoS 2 {m2:?}\n{}",
            broker.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let a late duplicate arrive before judging.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (a2, b1) = (a2.stop(), b1.stop());

    check_subscriber("B", &b1);
    check_subscriber("A before the kill", &a1);
    check_subscriber("A after its return", &a2);
    // At A, both stays together: no QoS 2 message twice.
    let at_a: Vec<String> = a1.iter().chain(&a2).cloned().collect();
    check_subscriber("A (both stays)", &at_a);
    let mb = by_topic(&b1);
    let m2 = by_topic(&a2);
    assert!(
        mb.get("up/q2/valve").is_some_and(|v| !v.is_empty()),
        "nothing went to the standby"
    );
    assert!(
        m2.get("up/q2/valve").is_some_and(|v| v.contains(&(n - 1))),
        "the last messages did not go to the primary after its return"
    );
    assert_eq!(
        local_sys(port, "address").await,
        addr_a,
        "address in use on $SYS"
    );
    eprintln!(
        "A before kill: {} lines, B: {} lines, A after return: {} lines",
        a1.len(),
        b1.len(),
        a2.len()
    );
    for line in broker.log().lines().filter(|l| {
        [
            "connected to the cloud",
            "moved to",
            "link lost",
            "reachable again",
            "go up here",
        ]
        .iter()
        .any(|k| l.contains(k))
    }) {
        eprintln!("{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_round_robin_the_bridge_stays_where_it_moved() {
    if mosquitto_mode() {
        return;
    }
    let mut a = node_with_collectors(&["a1"]);
    let b = node_with_collectors(&["b1"]);
    let addr_a = format!("mqtt://127.0.0.1:{}", a.port);
    let addr_b = format!("mqtt://127.0.0.1:{}", b.port);
    let b1 = Collector::start(&b, "b1");
    let broker = Broker::outpost_with_full_config(&gateway_config(
        &a,
        &b,
        "round_robin = true\nprimary_retry = \"1s\"",
    ));
    wait_log(&broker, &format!("waiting in the spool; using {addr_a}"), 1).await;
    a.kill9();
    wait_log(&broker, &format!("waiting in the spool; using {addr_b}"), 1).await;
    a.start();
    let a1 = Collector::start(&a, "a1");
    // Give a wrong "go back" its chance: several primary_retry periods with A up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    publish_acked(
        broker.port(),
        "pub-q2",
        "q2/valve",
        QoS::ExactlyOnce,
        0,
        200,
    )
    .await;
    let deadline = Instant::now() + WAIT;
    while by_topic(&b1.lines()).get("up/q2/valve").map_or(0, Vec::len) < 200 {
        assert!(Instant::now() < deadline, "not at B\n{}", broker.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = broker.log();
    assert!(!log.contains("primary address is reachable again"), "{log}");
    assert_eq!(
        log.matches(&format!("waiting in the spool; using {addr_a}"))
            .count(),
        1,
        "{log}"
    );
    assert!(a1.stop().is_empty(), "messages went to A");
    check_subscriber("B", &b1.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_restarted_after_a_move_remembers_which_broker_its_qos2_stages_belong_to() {
    if mosquitto_mode() {
        return;
    }
    let mut a = node_with_collectors(&["a1"]);
    let mut b = node_with_collectors(&["b1"]);
    b.stop();
    let addr_a = format!("mqtt://127.0.0.1:{}", a.port);
    let addr_b = format!("mqtt://127.0.0.1:{}", b.port);
    // The backlog drains slowly enough (replay_rate) for the gateway to die in the middle.
    let mut broker = Broker::outpost_with_full_config(&gateway_config(
        &a,
        &b,
        "round_robin = false\nprimary_retry = \"1s\"\nreplay_rate = 300",
    ));
    wait_log(&broker, &format!("waiting in the spool; using {addr_a}"), 1).await;
    a.kill9();
    let n = 2000u32;
    publish_acked(broker.port(), "pub-q2", "q2/valve", QoS::ExactlyOnce, 0, n).await;

    // B takes over the backlog; the gateway is killed while it drains there.
    b.start();
    let b1 = Collector::start(&b, "b1");
    wait_log(&broker, &format!("waiting in the spool; using {addr_b}"), 1).await;
    let deadline = Instant::now() + WAIT;
    while b1.lines().len() < 300 {
        assert!(
            Instant::now() < deadline,
            "nothing reached B\n{}",
            broker.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    broker.kill9();
    assert!(
        b1.lines().len() < n as usize,
        "the drain was over before the kill; nothing tested"
    );

    // The primary is back before the gateway: the restarted gateway goes there, and knows
    // (from the spool's side file) that its QoS 2 stages belong to B, so A starts afresh.
    a.start();
    let a1 = Collector::start(&a, "a1");
    broker.restart();
    wait_log(&broker, &format!("waiting in the spool; using {addr_a}"), 2).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let (la, lb) = (a1.lines(), b1.lines());
        let gone = missing(&[&la, &lb], "up/q2/valve", n);
        if gone.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "acknowledged QoS 2 messages lost: {gone:?}\n{}",
            broker.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (la, lb) = (a1.stop(), b1.stop());
    check_subscriber("A", &la);
    check_subscriber("B", &lb);
    let log = broker.log();
    let after_restart = log.split("---- restart ----").nth(1).unwrap_or_default();
    assert!(
        after_restart.contains("moved to another broker: started a fresh session there"),
        "the restarted gateway forgot where its QoS 2 stages were made:\n{log}"
    );
    eprintln!(
        "B before the kill: {} lines, A after the restart: {} lines",
        lb.len(),
        la.len()
    );
}
