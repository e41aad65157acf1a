//! A cloud that is not Mosquitto: a real RabbitMQ 3.10 (Debian 12) with its MQTT plugin,
//! which speaks 3.1.1 only, has no QoS 2 (it answers a QoS 2 PUBLISH with PUBACK, against
//! MQTT-4.3.3-9), and keeps sessions as durable queues. The bridge runs on its defaults
//! (`max_qos = 2`): nothing the gateway acknowledged while RabbitMQ was down is lost, order
//! is kept per topic, nothing is set aside as poison, and the retained birth is there.

use std::process::Command;
use std::time::{Duration, Instant};

use outpost_mqtt::QoS;
use outpost_tests::broker::{Broker, mosquitto_mode};
use outpost_tests::cloud::{CloudSubscriber, publish_acked};
use outpost_tests::rabbit::{Rabbit, RabbitCluster};

const WAIT: Duration = Duration::from_secs(60);

/// Payloads of `topic` in arrival order, from `topic payload` lines.
fn payloads(lines: &[String], topic: &str) -> Vec<u32> {
    let prefix = format!("{topic} ");
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|p| p.parse().unwrap_or(u32::MAX))
        .collect()
}

/// Each value once, at its first arrival (QoS 1 is at least once).
fn first_arrivals(got: Vec<u32>) -> Vec<u32> {
    let mut seen = std::collections::HashSet::new();
    got.into_iter().filter(|p| seen.insert(*p)).collect()
}

/// Waits until 0..n arrived on both `up/q2/valve` and `up/q1/temp` and asserts each topic's
/// first arrivals are exactly 0..n in order; `logs` explains a timeout.
async fn all_in_order(sub: &CloudSubscriber, n: u16, logs: impl Fn() -> String) {
    let want: Vec<u32> = (0..u32::from(n)).collect();
    let deadline = Instant::now() + WAIT;
    loop {
        let lines = sub.lines();
        let q2 = first_arrivals(payloads(&lines, "up/q2/valve"));
        let q1 = first_arrivals(payloads(&lines, "up/q1/temp"));
        if q2.len() >= want.len() && q1.len() >= want.len() {
            assert_eq!(q2, want, "QoS 2 traffic: order or content");
            assert_eq!(q1, want, "QoS 1 traffic: order or content");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} + {} of {n} + {n} arrived\n{}",
            q2.len(),
            q1.len(),
            logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_without_qos2_gets_everything_spooled_during_its_outage_in_order() {
    if mosquitto_mode() {
        return;
    }
    let mut rabbit = Rabbit::new();
    rabbit.start();
    // A persistent session (a durable queue) that collects while nobody reads it.
    let mut reg = CloudSubscriber::start_at(rabbit.port, rabbit.dir(), "collector", "up/#", 1, 2);
    let _ = reg.child.wait();
    rabbit.stop();

    let broker = Broker::outpost_with_full_config(&format!(
        r#"gateway_id = "gw-r"
[broker]
listeners = [{{ bind = "127.0.0.1:0" }}]
[[bridge]]
name = "rabbit"
address = "mqtt://127.0.0.1:{port}"
protocol = "3.1.1"
topics = [
  {{ pattern = "q2/#", direction = "out", qos = 2, remote_prefix = "up/" }},
  {{ pattern = "q1/#", direction = "out", qos = 1, remote_prefix = "up/" }},
]
reconnect = {{ min = "200ms", max = "1s" }}
"#,
        port = rabbit.port
    ));
    let n = 200u16;
    // Acknowledged by the gateway while the cloud is down: only the spool holds them.
    publish_acked(broker.port(), "pub2", "q2/valve", QoS::ExactlyOnce, n).await;
    publish_acked(broker.port(), "pub1", "q1/temp", QoS::AtLeastOnce, n).await;

    rabbit.start();
    let sub = CloudSubscriber::start_at(
        rabbit.port,
        rabbit.dir(),
        "collector",
        "up/#",
        100_000,
        WAIT.as_secs() as u32,
    );
    all_in_order(&sub, n, || {
        format!(
            "--- gateway\n{}\n--- rabbitmq\n{}",
            broker.log(),
            rabbit.log()
        )
    })
    .await;

    // Live traffic after the drain goes straight through.
    publish_acked(broker.port(), "pub3", "q1/live", QoS::AtLeastOnce, 50).await;
    let deadline = Instant::now() + WAIT;
    while first_arrivals(payloads(&sub.lines(), "up/q1/live")).len() < 50 {
        assert!(
            Instant::now() < deadline,
            "live messages did not arrive\n{}",
            broker.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        first_arrivals(payloads(&sub.lines(), "up/q1/live")),
        (0..50).collect::<Vec<u32>>()
    );

    let log = broker.log();
    assert!(
        !log.contains("poison message: "),
        "a message was set aside\n{log}"
    );
    // RabbitMQ 3.10 delivers a retained message to an exact-topic subscription.
    let status = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &rabbit.port.to_string()])
        .args(["-t", "outpost/gw-r/status", "-C", "1", "-W", "10"])
        .output()
        .expect("mosquitto_sub");
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("online"),
        "no birth on RabbitMQ: {status:?}\n{log}"
    );
}

/// A cluster that loses the node the bridge uses: three RabbitMQ nodes (client-id tracking
/// needs a majority), the bridge given two of them with `shared_session = true`, a
/// collector on the third. Node 0 is killed (SIGKILL) while the gateway's backlog drains;
/// the bridge moves to node 1 with the same client id, and every message the gateway
/// acknowledged arrives, in order per topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rabbitmq_cluster_losing_the_node_in_use_loses_nothing() {
    if mosquitto_mode() {
        return;
    }
    let mut cluster = RabbitCluster::start(3);
    let sub = CloudSubscriber::start_at(
        cluster.port(2),
        cluster.dir(),
        "collector",
        "up/#",
        100_000,
        WAIT.as_secs() as u32 + 60,
    );
    let broker = Broker::outpost_with_full_config(&format!(
        r#"gateway_id = "gw-rc"
[broker]
listeners = [{{ bind = "127.0.0.1:0" }}]
[[bridge]]
name = "rabbit"
address = ["mqtt://127.0.0.1:{a}", "mqtt://127.0.0.1:{b}"]
shared_session = true
protocol = "3.1.1"
topics = [
  {{ pattern = "q2/#", direction = "out", qos = 2, remote_prefix = "up/" }},
  {{ pattern = "q1/#", direction = "out", qos = 1, remote_prefix = "up/" }},
]
reconnect = {{ min = "200ms", max = "1s" }}
"#,
        a = cluster.port(0),
        b = cluster.port(1)
    ));
    let n = 300u16;
    let first = tokio::spawn({
        let port = broker.port();
        async move {
            publish_acked(port, "pub2", "q2/valve", QoS::ExactlyOnce, n).await;
        }
    });
    // Kill the node in use once part of the stream has crossed it.
    let deadline = Instant::now() + WAIT;
    while payloads(&sub.lines(), "up/q2/valve").len() < 50 {
        assert!(
            Instant::now() < deadline,
            "nothing arrived through node 0\n--- gateway\n{}\n{}",
            broker.log(),
            cluster.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.kill9(0);
    first.await.unwrap();
    publish_acked(broker.port(), "pub1", "q1/temp", QoS::AtLeastOnce, n).await;

    all_in_order(&sub, n, || {
        format!("--- gateway\n{}\n{}", broker.log(), cluster.log())
    })
    .await;
    let log = broker.log();
    assert!(
        log.contains(&format!("using mqtt://127.0.0.1:{}", cluster.port(1))),
        "the bridge did not move to node 1\n{log}"
    );
    assert!(
        !log.contains("poison message: "),
        "a message was set aside\n{log}"
    );
}
